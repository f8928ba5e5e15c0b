"""Wide NF4 config sweep on the GPU machine: compile every candidate in parallel worker processes (Triton's disk
cache), then time them one by one in this process (graph replays, rotated inputs), and print the best per
(shape, M) beside the committed table's config and bf16 cuBLAS. `--ncu` runs one (shape, M, config) a few times
for Nsight Compute instead.

    python3 benchmarks/nf4_sweep.py --out $OUT [--ms 1,8,32] [--shapes gate_up,qkv,o,down] [--workers 14]
    ncu ... python3 benchmarks/nf4_sweep.py --ncu gate_up:32:'{"kernel": "gemm", ...}'
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from loraplex.server.nf4.format import NF4Weight
from loraplex.server.nf4.kernel_config import KernelConfig, fit

SHAPES = {  # name: (op, N rows of the fused weight, K)
    "gate_up": ("gate_up_silu", 28672, 4096),
    "gate_up_lin": ("linear", 28672, 4096),
    "qkv": ("linear", 6144, 4096),
    "o": ("linear", 4096, 4096),
    "down": ("linear", 4096, 14336),
}


def grid(m: int, n_out: int, k: int, sms: int, gated: bool, wide: bool,
         stages_list: tuple = (2, 3, 4)) -> list[KernelConfig]:
    """Candidates for one (shape, M): tl.dot swap-AB tiles over tile sizes, warps, stages and split-K; the FMA
    GEMV at M <= 4."""
    out = []
    bns = (64, 128, 256) if wide else (64, 128)
    for bn, bk, warps, stages in itertools.product(bns, (64, 128, 256), (4, 8), stages_list):
        base = KernelConfig(kernel="gemm", block_m=max(16, m), block_n=bn, block_k=bk, swap_ab=True,
                            num_warps=warps, num_stages=stages)
        for split in (1, 2, 4, 8, 16):
            if k // split >= 2 * bk:
                out.append(replace(base, split_k=split))
    if m <= 4:
        for bn, bk, warps, stages, split in itertools.product((16, 32, 64), (256, 512), (4, 8), stages_list, (1, 2, 4)):
            out.append(KernelConfig(kernel="gemv", block_m=m, block_n=bn, block_k=bk, split_k=split,
                                    num_warps=warps, num_stages=stages))
    fitted = []
    for cfg in out:
        cfg = fit(cfg, m, n_out, k, 2, gated, sms)
        if cfg not in fitted:
            fitted.append(cfg)
    return fitted


def weight(name: str, seed: int = 0) -> tuple[NF4Weight, bool, int]:
    op, n_rows, k = SHAPES[name]
    gated = op == "gate_up_silu"
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seg = [n_rows // 2, n_rows // 2] if gated else [n_rows]
    w = NF4Weight.quantize([torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k ** 0.5
                            for n in seg])
    return w, gated, (n_rows // 2 if gated else n_rows)


def _compile_worker(args) -> int:
    """Launch each config once (compiles into the shared disk cache); returns how many failed."""
    jobs, = args
    from loraplex.server.nf4 import triton_kernels as tk

    failed = 0
    cache: dict = {}
    for name, m, cfg in jobs:
        if name not in cache:
            cache[name] = weight(name)
        w, gated, _ = cache[name]
        try:
            tk.matmul(torch.randn(m, w.in_features, device="cuda", dtype=torch.bfloat16), w, None, gated, cfg)
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - timed (and reported) by the main process
            failed += 1
    return failed


def sweep(names: list[str], ms: list[int], workers: int, wide: bool, out: Path, stages: tuple) -> None:
    from loraplex.server.nf4 import reference, triton_kernels as tk, tuning
    from loraplex.server.nf4.timing import rotations, time_per_call_us

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    jobs = []
    for name in names:
        op, n_rows, k = SHAPES[name]
        gated = op == "gate_up_silu"
        n_out = n_rows // 2 if gated else n_rows
        for m in ms:
            jobs += [(name, m, c) for c in grid(m, n_out, k, sms, gated, wide, stages)]
    t0 = time.time()
    uniq = list({(j[0] if SHAPES[j[0]][0] == "gate_up_silu" else "qkv", j[1] if j[1] > 16 else 16,
                  replace(j[2], split_k=1)): j for j in jobs}.values())  # compile keys: gated, block_m, tiles
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        failed = sum(pool.map(_compile_worker, [([j for i, j in enumerate(uniq) if i % workers == r],)
                                                for r in range(workers)]))
    print(f"compiled {len(uniq)} variants ({failed} failed) for {len(jobs)} configs in {time.time() - t0:.0f} s",
          flush=True)
    results = []
    for name in names:
        base, gated, n_out = weight(name)
        n_w = rotations(base.nbytes)
        ws = [base] + [NF4Weight(**{f: t.clone() for f, t in base.tensors().items()}, in_features=base.in_features,
                                 segment_rows=base.segment_rows, dtype=base.dtype) for _ in range(n_w - 1)]
        dense = reference.dequantize(base, torch.bfloat16)
        for m in ms:
            xs = [torch.randn(m, base.in_features, device="cuda", dtype=torch.bfloat16) for _ in range(n_w)]
            ref = xs[0].float() @ dense.float().t()
            if gated:
                ref = torch.nn.functional.silu(ref[:, :n_out]) * ref[:, n_out:]
            denses = [dense] + [dense.clone() for _ in range(min(n_w, 4) - 1)]
            cublas, _ = time_per_call_us(lambda i: torch.nn.functional.linear(xs[i], denses[i % len(denses)]), n_w)
            committed = tuning.lookup(SHAPES[name][0], base.out_features, base.in_features, m, xs[0].device,
                                      torch.bfloat16)
            rows = []
            cands = grid(m, n_out, base.in_features, sms, gated, wide, stages)
            if committed not in cands:
                cands.insert(0, committed)
            for cfg in cands:
                try:
                    y = tk.matmul(xs[0], base, None, gated, cfg).float()
                    err = float((y - ref).norm() / ref.norm())
                    if not err < 2e-2:
                        print(f"  wrong {name} M={m} {cfg}: {err:.3g}")
                        continue
                    us, _ = time_per_call_us(lambda i, c=cfg: tk.matmul(xs[i], ws[i], None, gated, c), n_w,
                                             replays=3)
                    rows.append((us, cfg))
                except Exception as exc:  # noqa: BLE001
                    print(f"  fail {name} M={m} {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
            rows.sort(key=lambda r: r[0])
            cur = next((us for us, c in rows if c == committed), float("nan"))
            gbs = base.nbytes / (rows[0][0] * 1e-6) / 1e9
            print(f"{name:8s} M={m:3d} best {rows[0][0]:7.1f} us ({gbs:5.0f} GB/s) committed {cur:7.1f} "
                  f"cublas {cublas:6.1f} | {_short(rows[0][1])} | next: "
                  + "; ".join(f"{us:.1f} {_short(c)}" for us, c in rows[1:4]), flush=True)
            results.append({"shape": name, "m": m, "cublas_us": cublas, "committed_us": cur,
                            "committed": committed.to_dict(), "nbytes": base.nbytes,
                            "top": [{"us": us, "config": c.to_dict()} for us, c in rows[:12]]})
        del ws
        torch.cuda.empty_cache()
    (out / f"nf4_sweep_{int(time.time())}.json").write_text(json.dumps(results, indent=1))


def _short(c: KernelConfig) -> str:
    return (f"{c.kernel} m{c.block_m} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}"
            + (" swap" if c.swap_ab else ""))


def ncu_one(spec: str) -> None:
    from loraplex.server.nf4 import triton_kernels as tk

    name, m, cfg = spec.split(":", 2)
    w, gated, _ = weight(name)
    x = torch.randn(int(m), w.in_features, device="cuda", dtype=torch.bfloat16)
    cfg = KernelConfig(**json.loads(cfg))
    for _ in range(4):
        tk.matmul(x, w, None, gated, cfg)
    torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--ms", default="1,8,32")
    p.add_argument("--shapes", default="gate_up,qkv,o,down")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--narrow", action="store_true", help="fewer tile widths")
    p.add_argument("--stages", default="2,3,4", help="num_stages values to sweep")
    p.add_argument("--ncu", default=None, help="shape:M:config-json: run it 4 times (for Nsight Compute)")
    a = p.parse_args()
    if a.ncu:
        ncu_one(a.ncu)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep(a.shapes.split(","), [int(m) for m in a.ms.split(",")], a.workers, not a.narrow, out,
          tuple(int(s) for s in a.stages.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
