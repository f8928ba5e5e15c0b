"""`loraplex bench train` pieces on the CPU with a tiny NF4 model (the real run is on a GPU)."""
from __future__ import annotations

import argparse
import json

from loraplex.training.bench import (TrainBenchConfig, _ratios, add_bench_train_parser, full_row_examples,
                                     run_bench_train, sides_for, synthetic_examples)
from loraplex.training.encode import IGNORE


def test_synthetic_examples_are_seeded_and_bounded():
    a = synthetic_examples(200, 256, 1000, seed=1)
    assert a == synthetic_examples(200, 256, 1000, seed=1) and a != synthetic_examples(200, 256, 1000, seed=2)
    lengths = [len(e.input_ids) for e in a]
    assert min(lengths) >= 32 and max(lengths) <= 256 and 40 < sorted(lengths)[100] < 110
    for e in a[:5]:
        prompt = int(len(e.input_ids) * 0.3)
        assert e.labels[:prompt] == (IGNORE,) * prompt and e.labels[prompt:] == e.input_ids[prompt:]


def test_full_row_examples_fill_the_row():
    rows = full_row_examples(5, 64, 1000, seed=0)
    assert len(rows) == 5 and {len(e.input_ids) for e in rows} == {64}
    assert all(e.labels[:19] == (IGNORE,) * 19 and e.labels[19:] == e.input_ids[19:] for e in rows)


def test_bench_runs_ours_beside_trl_on_the_same_tokens(tmp_path, tiny_base, capsys):
    """Both cases, every side, one JSON: ours and TRL see the same real tokens per step, and (LoRA B starts at
    zero, same seeded base) the same first loss: the comparison is like for like."""
    parser = argparse.ArgumentParser()
    add_bench_train_parser(parser.add_subparsers(dest="bench_command"))
    args = parser.parse_args(["train", "--model", str(tiny_base), "--device", "cpu", "--seq-len", "128",
                              "--batch-size", "2", "--steps", "2", "--warmup-steps", "1", "--num-examples", "24",
                              "--rank", "4", "--impls", "loraplex,trl,peft", "--out", str(tmp_path)])
    assert run_bench_train(args) == 0
    [path] = tmp_path.glob("train-cpu-*.json")
    report = json.loads(path.read_text())
    assert report["complete"] and report["environment"]["trl"]
    assert set(report["results"]["packed"]) == {"loraplex", "trl-sdpa", "peft"}
    assert set(report["results"]["full"]) == {"loraplex", "trl-sdpa"}  # full rows: no mask, sdpa is the best
    for case, results in report["results"].items():
        ours, trl = results["loraplex"], results["trl-sdpa"]
        for r in results.values():
            assert r["steps_measured"] == 2 and r["tokens_per_s"] > 0 and set(r["ran"]) >= {"attention", "liger"}
        assert ours["tokens_per_step"] == trl["tokens_per_step"] and ours["rows"] == trl["rows"]
        assert abs(ours["loss_first"] - trl["loss_first"]) < 1e-4
        ratio = report["ratios"][case]
        assert ratio["tokens_per_s"] == ours["tokens_per_s"] / max(
            r["tokens_per_s"] for key, r in results.items() if key.startswith("trl-"))
    assert report["results"]["full"]["loraplex"]["tokens_per_step"] == 2 * 128
    peft = report["results"]["packed"]["peft"]
    assert peft["rows"] == 24 and "padded" in peft["ran"]["rows"]  # the old baseline, labeled
    out = capsys.readouterr().out
    assert "packed loraplex / trl-" in out and "full   loraplex / trl-sdpa: x" in out


def test_the_peer_runs_each_attention_on_packed_rows_and_the_fastest_counts():
    cfg = TrainBenchConfig(device="cpu", impls=("loraplex", "trl"), peer_attentions=("sdpa", "flex_attention"))
    examples = synthetic_examples(8, 128, 1000, seed=0)
    packed = [(s.impl, s.attention, s.liger) for s in sides_for(cfg, "packed", examples)]
    assert packed == [("loraplex", "auto", "auto"), ("trl", "sdpa", "off"), ("trl", "flex_attention", "off")]
    assert [(s.impl, s.attention) for s in sides_for(cfg, "full", examples)] == [("loraplex", "auto"), ("trl", "sdpa")]
    results = {"loraplex": {"tokens_per_s": 300.0, "peak_memory_gb": 9.0},
               "trl-sdpa": {"tokens_per_s": 100.0, "peak_memory_gb": 10.0},
               "trl-flex_attention": {"tokens_per_s": 200.0, "peak_memory_gb": 12.0}}
    assert _ratios(results) == {"peer": "trl-flex_attention", "tokens_per_s": 1.5, "peak_memory": 0.75}
