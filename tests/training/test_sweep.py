"""Sweeps: a grid of real (tiny-model) runs, ranked by eval loss into CSV and markdown, with a PNG of the curves."""
from __future__ import annotations

import argparse
import csv

import pytest

from loraplex.server.errors import ConfigError
from loraplex.training.cli import add_train_parser, run_train
from loraplex.training.sweep import plan_runs

from .conftest import caps_chat, write_jsonl


def parse(argv):
    parser = argparse.ArgumentParser(prog="loraplex")
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


@pytest.fixture
def sweep_file(tmp_path, tiny_base):
    write_jsonl(tmp_path / "caps.jsonl", caps_chat(12))
    path = tmp_path / "sweep.toml"
    path.write_text(f"""
[train]
data = "caps.jsonl"
base = "{tiny_base}"
device = "cpu"
max_steps = 3
batch_size = 4
max_length = 64
eval_split = 0.25
save_steps = 0
logging_steps = 1
tensorboard = false
progress = false

[grid]
r = [2, 4]
target_modules = ["q_proj,v_proj", "all-linear"]
learning_rate = [1e-3, 3e-2]
""")
    return path


def test_sweep_ranks_runs_and_plots(sweep_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_train(parse(["--sweep", str(sweep_file), "--out", str(out), "--seed", "1"])) == 0
    with open(out / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and [r["rank"] for r in rows] == [str(i) for i in range(1, 9)]
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses == sorted(losses) and len(set(losses)) > 1
    assert {(r["r"], r["target_modules"], r["learning_rate"]) for r in rows} == {
        (r, t, lr) for r in ("2", "4") for t in ("q_proj,v_proj", "all-linear") for lr in ("0.001", "0.03")}
    markdown = (out / "sweep.md").read_text().splitlines()
    assert markdown[0].startswith("| rank | run | r | target_modules | learning_rate | eval_loss |")
    assert len(markdown) == 2 + 8 and rows[0]["run"] in markdown[2]
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for row in rows:
        assert (out / row["run"] / "adapter_model.safetensors").is_file()
    assert "best: " + rows[0]["run"] in capsys.readouterr().out
    # a second call reuses every finished run (an interrupted sweep continues)
    assert run_train(parse(["--sweep", str(sweep_file), "--out", str(out), "--seed", "1"])) == 0
    assert capsys.readouterr().out.count("done earlier, reused") == 8


@pytest.mark.parametrize("text, expected", [
    ("[grid]\nr = [2]\nbogus = [1]\n", r"\[grid\] bogus: not a train setting"),
    ("[train]\nlearning_rat = 1\n[grid]\nr = [2]\n", r"\[train\] learning_rat: not a train setting"),
    ("[grid]\nout = ['a']\n", r"\[grid\] out: cannot be swept"),
    ("[grid]\nr = 4\n", r"\[grid\] r: expected a non-empty list"),
    ("[train]\nr = 4\n", r"\[grid\] is empty"),
    ("[grid\nr = [1]", "invalid TOML"),
    ("[grid]\nr = [0, 4]\n", r"run00-r=0: invalid train config: r=0"),
    ("[train]\ndata = 'd.jsonl'\neval_split = 0.0\n[grid]\nr = [2]\n", "a sweep ranks by eval loss"),
])
def test_bad_sweep_files(tmp_path, text, expected):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        plan_runs(path, parse(["--out", str(tmp_path / "o"), "--data", "d.jsonl"]))


def test_a_flag_cannot_also_be_swept(sweep_file, tmp_path):
    with pytest.raises(ConfigError, match="r: set on the command line and swept"):
        plan_runs(sweep_file, parse(["--out", str(tmp_path / "o"), "--r", "8"]))


def test_the_shipped_example_sweep_plans(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "sweep.toml"
    runs = plan_runs(example, parse(["--out", str(tmp_path / "o")]))
    assert len(runs) == 8 and all(Path(cfg.data).is_file() for _, _, cfg in runs)
    assert {cfg.r for _, _, cfg in runs} == {4, 8} and len({cfg.out for _, _, cfg in runs}) == 8


def test_a_run_stopped_mid_sweep_resumes_from_its_checkpoint(tmp_path, tiny_base, capsys):
    import shutil

    write_jsonl(tmp_path / "d.jsonl", caps_chat(8))
    path = tmp_path / "s.toml"
    path.write_text(f'[train]\ndata = "d.jsonl"\nbase = "{tiny_base}"\ndevice = "cpu"\nmax_steps = 2\n'
                    'save_steps = 1\nsave_total_limit = 5\neval_split = 0.25\ntensorboard = false\n'
                    'progress = false\nmax_length = 64\n[grid]\nr = [2]\n')
    out = tmp_path / "sweep"
    assert run_train(parse(["--sweep", str(path), "--out", str(out)])) == 0
    [run] = [p for p in out.iterdir() if p.is_dir()]
    (run / "train_summary.json").unlink()  # as if the process died after checkpoint-1
    shutil.rmtree(run / "checkpoints" / "checkpoint-2")
    capsys.readouterr()
    assert run_train(parse(["--sweep", str(path), "--out", str(out)])) == 0
    assert "(resuming)" in capsys.readouterr().out
    assert (run / "train_summary.json").is_file() and (run / "checkpoints" / "checkpoint-2").is_dir()
