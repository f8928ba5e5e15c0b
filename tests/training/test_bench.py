"""`loraplex bench train` pieces on the CPU with a tiny NF4 model (the real run is on a GPU)."""
from __future__ import annotations

import argparse
import json

from loraplex.training.bench import add_bench_train_parser, run_bench_train, synthetic_examples
from loraplex.training.encode import IGNORE


def test_synthetic_examples_are_seeded_and_bounded():
    a = synthetic_examples(200, 256, 1000, seed=1)
    assert a == synthetic_examples(200, 256, 1000, seed=1) and a != synthetic_examples(200, 256, 1000, seed=2)
    lengths = [len(e.input_ids) for e in a]
    assert min(lengths) >= 32 and max(lengths) <= 256 and 40 < sorted(lengths)[100] < 110
    for e in a[:5]:
        prompt = int(len(e.input_ids) * 0.3)
        assert e.labels[:prompt] == (IGNORE,) * prompt and e.labels[prompt:] == e.input_ids[prompt:]


def test_bench_runs_both_implementations_and_writes_json(tmp_path, tiny_base, capsys):
    parser = argparse.ArgumentParser()
    add_bench_train_parser(parser.add_subparsers(dest="bench_command"))
    args = parser.parse_args(["train", "--model", str(tiny_base), "--device", "cpu", "--seq-len", "128",
                              "--batch-size", "2", "--baseline-batch-size", "3", "--steps", "2", "--warmup-steps", "1", "--num-examples", "24",
                              "--rank", "4", "--out", str(tmp_path)])
    assert run_bench_train(args) == 0
    [path] = tmp_path.glob("train-cpu-*.json")
    report = json.loads(path.read_text())
    assert report["complete"] and set(report["results"]) == {"loraplex", "peft"}
    ours, peft = report["results"]["loraplex"], report["results"]["peft"]
    for r in (ours, peft):
        assert r["steps_measured"] == 2 and r["tokens_per_s"] > 0 and r["loss_first"] > 0
    assert ours["rows"] < peft["rows"] == 24  # packed rows vs one example per row
    assert (ours["batch_size"], peft["batch_size"]) == (2, 3)
    assert ours["tokens_per_step"] > peft["tokens_per_step"]  # packing fills rows
    assert report["ratios"]["tokens_per_s"] > 0
    assert "loraplex / peft:" in capsys.readouterr().out
