"""`loraplex bench train`: our QLoRA training beside PEFT + TRL's SFTTrainer tuned as its docs say, in one run.

Model: the shape of a config.json (default Llama-3.1-8B) with seeded random weights, decoder linears in
NF4 (double quant), built by server/bench/peft_baseline.build_hf_nf4_model: no checkpoint needed.
Two cases, each run by every side (training/bench_sides.py says exactly what each side runs):

    packed  seeded examples, lengths log-normal in [32, seq_len] (median ~seq_len/4), the first 30% of each
            a prompt (no loss); each side packs them into rows of seq_len its own way (best-fit decreasing
            both), batch_size rows per step: the same real tokens per optimizer step within packing's slack
    full    every example exactly seq_len tokens: nothing to pack or pad, so packing cannot help anyone

Measured over the steps after `warmup_steps`: real (non-padding) tokens per second and peak GPU memory.
JSON to benchmarks/results/train-<device>-<time>.json, with what each side ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .bench_sides import SIDES, Side, run_side
from .encode import IGNORE, Encoded

CASES = ("packed", "full")
PEER_ATTENTIONS = ("sdpa", "flex_attention", "eager")


@dataclass(frozen=True, slots=True)
class TrainBenchConfig:
    model: str = "benchmarks/shapes/llama-3.1-8b"
    """Folder with config.json (random weights in its shape)."""
    device: str = "cuda"
    seq_len: int = 1024
    batch_size: int = 4
    """Rows of seq_len per optimizer step, every side (packed rows, or full-length examples)."""
    baseline_batch_size: int | None = None
    """Examples per step for the old padded `peft` baseline (default batch_size * seq_len / mean length)."""
    steps: int = 20
    warmup_steps: int = 3
    num_examples: int = 512
    """Examples of the packed case (the full case makes as many full rows as the steps need)."""
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0
    impls: tuple[str, ...] = ("loraplex", "trl")
    cases: tuple[str, ...] = CASES
    attention: str = "auto"
    """Ours: auto, sdpa or varlen."""
    liger: str = "auto"
    """Ours: auto, on or off."""
    checkpoint_layers: int | None = None
    """Ours: checkpoint only the first N decoder layers (None: all, like the peer)."""
    peer_attentions: tuple[str, ...] = ("sdpa",)
    """TRL on packed rows, one run each: sdpa (a dense block-diagonal mask over the flattened batch) and/or
    flex_attention (a block mask); no flash-attn package on our GPU image. Ours / TRL uses the fastest.
    Full rows: sdpa only (no mask at all, so SDPA's flash backend: nothing faster to offer)."""
    peer_liger: str = "auto"
    """TRL use_liger_kernel: on, off, or auto (on exactly when ours runs Liger: same kernels on both sides)."""


def add_bench_train_parser(bench_subparsers) -> None:
    """`train` under `loraplex bench` (wired beside `serve` in server/bench/cli.py)."""
    d = TrainBenchConfig()  # slots=True: class attributes are descriptors, not the defaults
    p = bench_subparsers.add_parser("train", help="QLoRA training tokens/s and peak memory, ours beside PEFT + TRL")
    p.add_argument("--model", default=d.model, help="folder with config.json (random weights)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows of seq-len per step, every side")
    p.add_argument("--baseline-batch-size", type=int, default=None,
                   help="examples per step for the old padded peft baseline")
    p.add_argument("--steps", type=int, default=d.steps, help="measured steps")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--num-examples", type=int, default=d.num_examples)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--impls", default=",".join(d.impls), help=f"comma-separated: {', '.join(SIDES)} (peft: the old "
                   "padded PEFT + Trainer baseline, packed case only)")
    p.add_argument("--cases", default=",".join(d.cases), help="comma-separated: packed, full")
    p.add_argument("--attention", default=d.attention, choices=["auto", "sdpa", "varlen"], help="ours")
    p.add_argument("--liger", default=d.liger, choices=["auto", "on", "off"], help="ours")
    p.add_argument("--checkpoint-layers", type=int, default=None, help="ours: checkpoint only the first N layers")
    p.add_argument("--peer-attention", default=",".join(d.peer_attentions),
                   help="TRL on packed rows, comma-separated, one run each: sdpa, flex_attention")
    p.add_argument("--peer-liger", default=d.peer_liger, choices=["auto", "on", "off"])
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")


def run_bench_train(args: argparse.Namespace, say=print) -> int:
    from loraplex.server.bench.cli import environment

    cfg = TrainBenchConfig(model=args.model, device=args.device, seq_len=args.seq_len, batch_size=args.batch_size,
                           baseline_batch_size=args.baseline_batch_size, steps=args.steps,
                           warmup_steps=args.warmup_steps, num_examples=args.num_examples, rank=args.rank,
                           impls=_names(args.impls, SIDES, "impl"), cases=_names(args.cases, CASES, "case"),
                           attention=args.attention, liger=args.liger, checkpoint_layers=args.checkpoint_layers,
                           peer_attentions=_names(args.peer_attention, PEER_ATTENTIONS, "peer attention"),
                           peer_liger=args.peer_liger)
    env = {**environment(cfg.device), **_versions()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train-{env['device_slug']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"benchmark": "train", "config": dataclasses.asdict(cfg), "environment": env, "results": {},
              "ratios": {}, "complete": False}
    model_config = json.loads((Path(cfg.model) / "config.json").read_text())
    vocab = int(model_config["vocab_size"])
    for case in cfg.cases:
        examples = synthetic_examples(cfg.num_examples, cfg.seq_len, vocab, cfg.seed) if case == "packed" else \
            full_row_examples((cfg.warmup_steps + cfg.steps) * cfg.batch_size, cfg.seq_len, vocab, cfg.seed)
        results = report["results"].setdefault(case, {})
        for side in sides_for(cfg, case, examples):
            key = side.impl if side.impl != "trl" else f"trl-{side.attention}"
            results[key] = run_side(side, cfg, model_config, examples)
            say(_line(results[key], key))
            path.write_text(json.dumps(report, indent=2))
        report["ratios"][case] = _ratios(results)
    report["complete"] = True
    path.write_text(json.dumps(report, indent=2))
    for line in table(report):
        say(line)
    say(f"wrote {path}")
    return 0


def sides_for(cfg: TrainBenchConfig, case: str, examples: list[Encoded]) -> list[Side]:
    """The runs of one case: the peer's Liger follows ours on auto, the peer runs once per attention on packed
    rows; the old padded baseline (packed case only) gets as many real tokens per step as batch_size rows."""
    from .kernels import resolve_liger

    cuda = cfg.device.startswith("cuda")
    sides = []
    for impl in cfg.impls:
        if impl == "loraplex":
            sides.append(Side(impl, case, cfg.batch_size, cfg.attention, cfg.liger, cfg.checkpoint_layers))
        elif impl == "trl":
            liger = cfg.peer_liger if cfg.peer_liger != "auto" else ("on" if resolve_liger(cfg.liger, cuda) else "off")
            for attention in cfg.peer_attentions if case == "packed" else ("sdpa",):
                sides.append(Side(impl, case, cfg.batch_size, attention, liger))
        elif case == "packed":  # on full rows the padded baseline is the trl side without its packing
            mean = sum(len(e.input_ids) for e in examples) / len(examples)
            batch = cfg.baseline_batch_size or max(1, round(cfg.batch_size * cfg.seq_len / mean))
            sides.append(Side(impl, case, batch, "sdpa", "off"))
    return sides


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad} (choose from {', '.join(allowed)})")
    return names


def _ratios(results: dict) -> dict:
    """Ours / the fastest TRL run of the case."""
    peers = [key for key in results if key.startswith("trl-")]
    if "loraplex" not in results or not peers:
        return {}
    best = max(peers, key=lambda key: results[key]["tokens_per_s"])
    ours, peer = results["loraplex"], results[best]
    memory = ours["peak_memory_gb"] / peer["peak_memory_gb"] if ours["peak_memory_gb"] and peer["peak_memory_gb"] \
        else None
    return {"peer": best, "tokens_per_s": ours["tokens_per_s"] / peer["tokens_per_s"], "peak_memory": memory}


def _line(r: dict, key: str) -> str:
    peak = f"{r['peak_memory_gb']:.2f} GB" if r["peak_memory_gb"] is not None else "-"
    return (f"{r['case']:6s} {key:18s}: {r['tokens_per_s']:10.1f} tok/s, peak {peak}, {r['step_s']:.3f} s/step, "
            f"{r['tokens_per_step']:.0f} real tokens/step, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")


def table(report: dict) -> list[str]:
    """A short table: every case and side, and ours / trl."""
    lines = [f"{'case':7s}{'side':20s}{'tokens/s':>11s}{'peak GB':>9s}{'tok/step':>9s}  attention / liger / ckpt"]
    for case, results in report["results"].items():
        for impl, r in results.items():
            ran = r["ran"]
            peak = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
            lines.append(f"{case:7s}{impl:20s}{r['tokens_per_s']:11.1f}{peak:>9s}{r['tokens_per_step']:9.0f}  "
                         f"{ran['attention'].split(' ')[0]} / {ran['liger'].split(',')[0]} / {ran['checkpointed_layers']}")
        ratio = report["ratios"].get(case)
        if ratio:
            memory = f"x{ratio['peak_memory']:.2f}" if ratio["peak_memory"] is not None else "not measured (CPU)"
            lines.append(f"{case:7s}loraplex / {ratio['peer']}: x{ratio['tokens_per_s']:.2f} tokens/s, "
                         f"peak memory {memory}")
    return lines


def _versions() -> dict:
    import importlib.metadata as metadata

    found = {}
    for package in ("trl", "liger-kernel", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def synthetic_examples(num: int, seq_len: int, vocab_size: int, seed: int) -> list[Encoded]:
    """Seeded token examples: log-normal lengths in [32, seq_len], the first 30% untrained (prompt)."""
    gen = torch.Generator().manual_seed(seed)
    median = max(32, seq_len // 4)
    lengths = torch.exp(torch.randn(num, generator=gen) * 0.7 + math.log(median)).clamp(32, seq_len).long()
    examples = []
    for n in lengths.tolist():
        ids = torch.randint(3, vocab_size, (n,), generator=gen).tolist()
        prompt = int(n * 0.3)
        examples.append(Encoded(tuple(ids), (IGNORE,) * prompt + tuple(ids[prompt:])))
    return examples


def full_row_examples(num: int, seq_len: int, vocab_size: int, seed: int) -> list[Encoded]:
    """Seeded examples of exactly seq_len tokens, the first 30% untrained (prompt)."""
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = int(seq_len * 0.3)
    examples = []
    for _ in range(num):
        ids = torch.randint(3, vocab_size, (seq_len,), generator=gen).tolist()
        examples.append(Encoded(tuple(ids), (IGNORE,) * prompt + tuple(ids[prompt:])))
    return examples
