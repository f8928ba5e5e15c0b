"""On-device check and timing of the grouped LoRA kernels (Triton) against the PyTorch twin.

    source scripts/device_env.sh && python benchmarks/lora_device_check.py          # ~1-2 min on one H200
    python benchmarks/lora_device_check.py --pools r16 --scenarios b8_shared,b32_distinct --sweep

Llama-3-8B shapes (hidden 4096, kv 1024, intermediate 14336), bf16, the engine's setup: one LoraStacks
of 64 slots for LAYERS layers (distinct weights per layer, so adapter rows come from HBM as in a real
step, not from L2), metadata from LoraMetaBuffers with the engine's capacities ('single': 1 pair per
sequence, 'mix': 8), decode steps padded to their batch bucket and replayed in a CUDA graph (graph-safe
metas), prefill steps eager. Two pool configurations:
  r16: max_rank 16 (what `loraplex bench serve` runs): slots 0..47 rank 16 everywhere, 48..63 ranks 4..16;
  r64: max_rank 64: slots 0..47 rank 16, 48..63 ranks 4..64.
Slot 63 adapts neither k_proj nor down_proj (the whole `down` group), the "one_skip" case.

Per scenario: us per layer (all four groups) in a CUDA graph (decode) or eager (prefill), ms per
32-layer step, GB/s of the unique bytes (A and B rows of the active slots at their ranks, x, out read
and written), the config of qkv and down, and checks on layer 0: kernel vs twin (delta error), base rows
untouched, run-to-run bit equality, graph replay == eager with the exact metadata bit for bit. A
failing case prints and the run continues; the exit status counts failures. --groups adds a per-group
split of the graph time; on r16 pools b8_shared and b32_distinct are also timed without programmatic
dependent launch; --sweep times more config variants (pipeline depth, tiles, the plan's L2 ratio, grid).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback

import numpy as np
import torch

from loraplex.server.buckets import batch_bucket
from loraplex.server.lora import apply as lora_apply
from loraplex.server.lora import grouped_reference
from loraplex.server.lora.apply import apply_lora, kernel_config
from loraplex.server.lora.stacks import GROUP_SLICES, LoraStacks, ProjectionGroupShape
from loraplex.server.lora.step_meta import LoraMetaBuffers

HIDDEN, KV, INTER = 4096, 1024, 14336
NUM_SLOTS, LAYERS, STEP_LAYERS = 64, 8, 32
MAX_TOKENS, MAX_SEQS, MIX_PAIRS = 4096, 256, 8
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SKIP_SLOT = 63
POOLS = {"r16": (16, (4, 8, 16)), "r64": (64, (4, 8, 16, 32, 64))}  # max_rank, ranks of slots 48..63
MODULES = [m for slices in GROUP_SLICES.values() for m in slices]


def distinct(n, first=0, span=48):
    return [((first + i % span, 1.0),) for i in range(n)]


SCENARIOS = {  # name -> (seq_pairs, tokens_per_seq); decode (all 1-token) ones run as graphs
    "b1": ([((0, 1.0),)], [1]),
    "b8_shared": ([((0, 1.0),)] * 8, [1] * 8),
    "b32_shared": ([((0, 1.0),)] * 32, [1] * 32),
    "b64_shared": ([((0, 1.0),)] * 64, [1] * 64),
    "b8_distinct": (distinct(8), [1] * 8),
    "b32_distinct": (distinct(32), [1] * 32),
    "b64_distinct": (distinct(64, 0, 64), [1] * 64),
    "b32_mixed_ranks": (distinct(32, 48, 16), [1] * 32),
    "b32_half_base": ([() if i % 2 else ((i % 48, 1.0),) for i in range(32)], [1] * 32),
    "b32_mix4": ([tuple(((i + 7 * k) % 48, 0.25 + 0.1 * k) for k in range(4)) for i in range(32)], [1] * 32),
    "one_skip": ([((SKIP_SLOT, 1.0),)] * 16, [1] * 16),
    "prefill128": ([((0, 1.0),)], [128]),
    "prefill2048": ([((0, 1.0),)], [2048]),
    "chunked": ([((0, 1.0),)] + distinct(31, 1), [2048] + [1] * 31),
}


R16_ONLY = ("b64_shared", "b8_distinct", "prefill2048", "chunked")
"""Left out of the default r64 pass (keeps the run within ~2 minutes, compiles included)."""


def slot_ranks(slot: int, small: tuple[int, ...]) -> dict[str, int]:
    if slot < 48:
        return {m: 16 for m in MODULES}
    ranks = {m: small[(slot + 3 * i) % len(small)] for i, m in enumerate(MODULES)}
    if slot == SKIP_SLOT:
        ranks["k_proj"] = ranks["down_proj"] = 0
    return ranks


def build(pools: str, dtype: torch.dtype, layers: int, device: str = "cuda") -> LoraStacks:
    """Random A/B at each slot's ranks; every pool row past a rank holds NaN (a read there shows)."""
    max_rank, small = POOLS[pools]
    outs = {"qkv": (HIDDEN, KV, KV), "o": (HIDDEN,), "gate_up": (INTER, INTER), "down": (HIDDEN,)}
    ins = {"qkv": HIDDEN, "o": HIDDEN, "gate_up": HIDDEN, "down": INTER}
    shapes = [ProjectionGroupShape(layer, n, GROUP_SLICES[n], ins[n], outs[n])
              for layer in range(layers) for n in GROUP_SLICES]
    stacks = LoraStacks(shapes, NUM_SLOTS, max_rank, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    ranks = [slot_ranks(s, small) for s in range(NUM_SLOTS)]
    for g in stacks.groups.values():
        k_in = g.shape.in_features
        g.a_pool.normal_(generator=gen).mul_(k_in ** -0.5)
        g.bt_pool.normal_(generator=gen).mul_(max_rank ** -0.5)
        for s in range(NUM_SLOTS):
            row0 = int(g.host_row_start[s])
            slot_r = [ranks[s][m] for m in g.shape.slices]
            for j, (r, n0, n) in enumerate(zip(slot_r, g.slice_offsets, g.out_features)):
                g.a_pool[j, row0 + r:row0 + max_rank] = float("nan")
                g.bt_pool[row0 + r:row0 + max_rank, n0:n0 + n] = float("nan")
            g.set_rank(s, slot_r)
    for s in range(NUM_SLOTS):
        stacks.slot_max_rank[s] = max(ranks[s].values())
    return stacks


def unique_bytes(stacks: LoraStacks, layer_groups, meta, num_tokens: int, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for g in layer_groups:
        for j, n in enumerate(g.out_features):
            total += sum(int(g.host_rank[j, s]) * (g.shape.in_features + n) for s in meta.active_slots) * size
        total += meta.num_active_tokens * (g.shape.in_features + 2 * sum(g.out_features)) * size
    return total


def time_us(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def delta_error(out, reference, base) -> float:
    scale = (reference.double() - base.double()).norm().item()
    if scale == 0.0:
        return 0.0 if torch.equal(out, base) else float("inf")
    return (out.double() - reference.double()).norm().item() / scale


class Bench:
    def __init__(self, stacks: LoraStacks, dtype: torch.dtype, layers: int, iters: int):
        self.stacks, self.dtype, self.layers, self.iters = stacks, dtype, layers, iters
        self.device = stacks.device
        self.buffers = {"single": LoraMetaBuffers(MAX_TOKENS, MAX_SEQS, 1, self.device),
                        "mix": LoraMetaBuffers(MAX_TOKENS, MAX_SEQS, MIX_PAIRS, self.device)}

    def layer_groups(self, layer: int):
        return [self.stacks.group(layer, n) for n in GROUP_SLICES]

    def tensors(self, rows: int, seed: int):
        gen = torch.Generator(device=self.device).manual_seed(seed)
        groups = [g for layer in range(self.layers) for g in self.layer_groups(layer)]
        xs = [torch.randn(rows, g.shape.in_features, generator=gen, device=self.device).to(self.dtype)
              for g in groups]
        bases = [torch.randn(rows, sum(g.out_features), generator=gen, device=self.device).to(self.dtype)
                 for g in groups]
        return groups, xs, bases

    def run(self, name: str, timing: bool, group_split: bool) -> tuple[str, int]:
        seq_pairs, tokens = SCENARIOS[name]
        decode = all(t == 1 for t in tokens)
        kind = "mix" if max(len(p) for p in seq_pairs) > 1 else "single"
        buffers = self.buffers[kind]
        num_tokens = sum(tokens)
        rows = batch_bucket(num_tokens) if decode else num_tokens
        groups, xs, bases = self.tensors(rows, seed=1)
        padded_pairs = list(seq_pairs) + [()] * (rows - num_tokens)
        padded_tokens = list(tokens) + [1] * (rows - num_tokens)
        exact = buffers.fill(padded_pairs, padded_tokens)
        problems = []

        # Checks on layer 0: kernel vs twin, base rows, determinism.
        base_rows = torch.repeat_interleave(torch.tensor([not p for p in padded_pairs]),
                                            torch.tensor(padded_tokens)).to(self.device)
        worst, eager_outs = 0.0, []
        for g, x, base in list(zip(groups, xs, bases))[:4]:
            out = apply_lora(base.clone(), x, g, exact)
            again = apply_lora(base.clone(), x, g, exact)
            twin = grouped_reference.add_lora(base.clone(), x, g, exact)
            err = delta_error(out, twin, base)
            worst = max(worst, err)
            if not torch.isfinite(out).all():
                problems.append(f"{g.shape.name}: non-finite")
            if not err < TOLERANCE[self.dtype]:
                problems.append(f"{g.shape.name}: err {err:.1e}")
            if not torch.equal(out, again):
                problems.append(f"{g.shape.name}: not deterministic")
            if not torch.equal(out[base_rows], base[base_rows]):
                problems.append(f"{g.shape.name}: base rows written")
            if name == "one_skip" and g.shape.name == "down" and not torch.equal(out, base):
                problems.append("down: a group the slot does not adapt was written")
            eager_outs.append(out)
        cfgs = {n: kernel_config(xs[i], groups[i], exact) for i, n in ((0, "qkv"), (3, "down"))}
        cfg_text = " ".join(f"{n}:{'F' if c.fused else 'S'}{c.max_split if not c.fused else ''}"
                            f"/r{c.block_r}/k{c.block_k}/n{c.block_n}" for n, c in cfgs.items())
        row = f"{name:<16} {num_tokens:>5} {rows:>5} {len(exact.active_slots):>3} {worst:>8.1e} {cfg_text:<44}"
        if not timing:
            return row + ("  OK" if not problems else "  FAIL " + "; ".join(problems)), len(problems)

        outs = [b.clone() for b in bases]
        if decode:
            safe = buffers.fill(padded_pairs, padded_tokens, num_tokens_padded=rows, graph_safe=True)

            def step(which=None):
                for i, (g, x, o) in enumerate(zip(groups, xs, outs)):
                    if which is None or i % 4 == which:
                        apply_lora(o, x, g, safe)

            graph = capture(step)
            for o, b in zip(outs, bases):
                o.copy_(b)
            graph.replay()
            torch.cuda.synchronize()
            if not all(torch.equal(a, b) for a, b in zip(outs[:4], eager_outs)):
                problems.append("graph replay != eager (exact meta)")
            total_us = time_us(graph.replay, self.iters)
            per_group = ""
            if group_split:
                parts = [time_us(capture(lambda w=w: step(w)).replay, self.iters) / self.layers for w in range(4)]
                per_group = " [" + " ".join(f"{n}:{t:.1f}" for n, t in zip(GROUP_SLICES, parts)) + "]"
        else:
            def step():
                for g, x, o in zip(groups, xs, outs):
                    apply_lora(o, x, g, exact)

            total_us = time_us(step, max(3, self.iters // 4))
            per_group = ""
        layer_us = total_us / self.layers
        gbs = unique_bytes(self.stacks, groups[:4], exact, num_tokens, self.dtype) / layer_us / 1e3
        row += (f" {'graph' if decode else 'eager':>5} {layer_us:>8.1f} {layer_us * STEP_LAYERS / 1e3:>7.2f}"
                f" {gbs:>6.0f}{per_group}")
        return row + ("  OK" if not problems else "  FAIL " + "; ".join(problems)), len(problems)


VARIANTS = {  # config changes applied on top of the heuristic (decode scenarios): name -> dataclasses.replace kwargs
    "nopdl": dict(pdl=False),
    "stages3": dict(num_stages=3),
    "bk256": dict(block_k=256),
    "bn128": dict(block_n=128),
    "l2_32": dict(l2_streams=32),
    "l2_128": dict(l2_streams=128),
    "grid2x": dict(programs=-2),  # negative: a multiple of the heuristic's grid
    "warps8": dict(num_warps=8),
    "grid4x": dict(programs=-4),
    "g2w8": dict(programs=-2, num_warps=8),
    "g4bn128": dict(programs=-4, block_n=128),
    "g4st2": dict(programs=-4, num_stages=2),
    "g8bn64": dict(programs=-8, block_n=64),
}
QUICK_VARIANTS = ("nopdl",)
"""Run by default on r16 b8_shared / b32_distinct: PDL is the newest piece, so its effect is always shown."""


def sweep(bench: Bench, names: list[str], variants) -> None:
    original = lora_apply.choose
    for variant in variants:
        change = VARIANTS[variant]

        def patched(*args, change=change, **kwargs):
            cfg = original(*args, **kwargs)
            if "block_k" in change and args[3] % change["block_k"]:
                return cfg
            if change.get("programs", 0) < 0:  # negative: a multiple of the heuristic's grid
                change = {**change, "programs": -change["programs"] * cfg.programs}
            return dataclasses.replace(cfg, **change)

        lora_apply.choose = patched
        try:
            for name in names:
                try:
                    row, _ = bench.run(name, timing=True, group_split=False)
                except Exception:  # noqa: BLE001
                    row = f"{name} FAIL {traceback.format_exc(limit=2)}"
                print(f"  {variant:<8} {row}", flush=True)
        finally:
            lora_apply.choose = original


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pools", default="r16,r64")
    parser.add_argument("--scenarios", default=None, help="default: all on r16; the decode ones + prefill128 on r64")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--groups", action="store_true", help="per-group split of decode graph times")
    parser.add_argument("--sweep", action="store_true", help="time config variants of decode scenarios (r16)")
    parser.add_argument("--dtypes", default="bf16", help="bf16 (timed); fp16 / fp32 are checked only")
    parser.add_argument("--dry-run", action="store_true", help="CPU, one layer, checks only (the twin vs itself)")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        print(f"device: cpu (dry run)  torch {torch.__version__}", flush=True)
    else:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  SMs "
              f"{torch.cuda.get_device_properties(0).multi_processor_count}", flush=True)
    failures, started = 0, time.monotonic()
    header = (f"{'scenario':<16} {'tok':>5} {'rows':>5} {'act':>3} {'delta_err':>8} {'config (qkv, down)':<44} "
              f"{'mode':>5} {'us/layer':>8} {'ms/step':>7} {'GB/s':>6}")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for pools in args.pools.split(","):
        names = (args.scenarios or ",".join(n for n in SCENARIOS if pools == "r16" or n not in R16_ONLY)).split(",")
        for dname in args.dtypes.split(","):
            dtype = dtypes[dname]
            timing = dtype == torch.bfloat16 and not args.dry_run
            layers = args.layers if timing else 1
            try:
                stacks = build(pools, dtype, layers, device)
            except Exception:  # noqa: BLE001 - report and go on
                failures += 1
                print(f"{pools} {dname}: build FAILED\n{traceback.format_exc(limit=3)}", flush=True)
                continue
            bench = Bench(stacks, dtype, layers, args.iters)
            print(f"\n== llama3_8b pools {pools} (max_rank {stacks.max_rank}) {dname}, {layers} layers "
                  f"({stacks.num_bytes / 2**30:.2f} GiB){'' if timing else ' (check only)'}  "
                  f"[{time.monotonic() - started:.0f} s]\n{header}", flush=True)
            checked = names if timing or args.dry_run else [n for n in names
                                                            if n in ("one_skip", "b32_mix4", "chunked")]
            for name in checked:
                try:
                    row, bad = bench.run(name, timing, args.groups and pools == "r16")
                except Exception:  # noqa: BLE001 - report and go on
                    row, bad = f"{name:<16} FAIL\n{traceback.format_exc(limit=4)}", 1
                failures += bool(bad)
                print(row, flush=True)
            if timing and pools == "r16":
                if args.sweep:
                    print("-- sweep (r16): variant, then the row as above", flush=True)
                    sweep(bench, [n for n in ("b1", "b8_shared", "b32_shared", "b32_distinct", "b64_distinct")
                                  if n in names], VARIANTS)
                else:
                    print("-- variants (r16): variant, then the row as above", flush=True)
                    sweep(bench, [n for n in ("b8_shared", "b32_distinct") if n in names], QUICK_VARIANTS)
            del stacks, bench
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{failures} failing rows, {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
