"""`loraplex bench adapters` end to end on the embedded model (CPU): real PEFT folders, a real engine, open-loop
Zipf traffic over more adapters than slots and host copies; its workload's statistics; its argument errors."""
from __future__ import annotations

import json

import numpy as np

from loraplex.server.bench.adapter_traffic import AdapterTrafficConfig, workload
from loraplex.server.cli import main


def test_workload_is_poisson_and_zipf():
    cfg = AdapterTrafficConfig(rate=50.0, duration_s=40.0, zipf_s=1.0, prompt_len=(64, 8, 256),
                               output_len=(32, 4, 128), seed=3)
    rows = workload(cfg, num_adapters=8, vocab_size=100)
    assert abs(len(rows) - 2000) < 5 * 2000 ** 0.5  # Poisson count around rate x duration
    arrivals = np.array([r[0] for r in rows])
    assert (np.diff(arrivals) >= 0).all() and 0 <= arrivals[0] and arrivals[-1] <= 40.0
    counts = np.sort(np.bincount([r[1] for r in rows], minlength=8))[::-1]
    expected = (1 / np.arange(1, 9)) / (1 / np.arange(1, 9)).sum() * len(rows)
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))  # rank k drawn with weight 1/k
    prompts = np.array([len(r[2]) for r in rows])
    outputs = np.array([r[3] for r in rows])
    assert prompts.min() >= 8 and prompts.max() <= 256 and abs(np.median(prompts) - 64) <= 8
    assert outputs.min() >= 4 and outputs.max() <= 128 and abs(np.median(outputs) - 32) <= 4
    assert workload(cfg, 8, 100) == rows  # seeded


def test_bench_adapters_runs_and_writes_json(embedded_dir, tmp_path, capsys):
    code = main(["bench", "adapters", "--model", str(embedded_dir), "--load-format", "auto", "--quantization",
                 "none", "--dtype", "float32", "--device", "cpu", "--num-adapters", "6", "--rank", "4",
                 "--rate", "5", "--duration", "2", "--prompt-len", "12,6,24", "--output-len", "4,2,6",
                 "--max-loras", "2", "--max-cpu-loras", "3", "--max-num-seqs", "8", "--max-batched-tokens", "256",
                 "--kv-tokens", "4096", "--adapters-dir", str(tmp_path / "adapters"), "--out", str(tmp_path)])
    assert code == 0
    [path] = list(tmp_path.glob("adapters-cpu-*.json"))
    report = json.loads(path.read_text())
    [row] = report["rows"]
    assert report["benchmark"] == "adapters" and report["config"]["num_adapters"] == [6]
    assert row["num_adapters"] == 6 and row["requests"] >= 3 and row["errors"] == 0
    assert row["tokens_per_s"] > 0 and row["ttft_ms"]["p50"] > 0 and row["max_token_gap_ms"]["max"] is not None
    assert 0 <= row["host_hit_rate"] <= 1 and 0 <= row["device_hit_rate"] <= 1
    assert row["host_loads"] >= 1 and row["load_ms"]["p50"] > 0  # six adapters over three host copies
    assert len(list((tmp_path / "adapters").rglob("adapter_model.safetensors"))) == 6
    assert "loraplex adapters     6" in capsys.readouterr().out


def test_bad_length_triple_is_one_line(capsys, tmp_path):
    assert main(["bench", "adapters", "--prompt-len", "10,20,5", "--out", str(tmp_path)]) == 2
    assert "--prompt-len" in capsys.readouterr().err
