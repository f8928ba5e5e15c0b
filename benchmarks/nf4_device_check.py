"""NF4 kernels on a CUDA device: correctness of every kernel family, tuning, and the kernels benchmark.

On the GPU machine, from the repository root (after `source scripts/device_env.sh`):

    python benchmarks/nf4_device_check.py --out $OUT            # all phases, ~3-4 minutes on an H200
    python benchmarks/nf4_device_check.py --out $OUT --phases tune,bench      # ~2.5 minutes

Phases (--phases, comma-separated): check (bit-exactness against bitsandbytes, every kernel against its twin
with configs fitted to each dtype as ops does, the LUT kernel's exact one-hot values, determinism, CUDA-graph
replay), tune (writes $OUT/<GPU>.json: commit it as server/nf4/configs/<GPU>.json; stops starting new entries
after --tune-budget-s), bench (the `loraplex bench kernels` report with the tuned configs, $OUT/kernels-*.json,
and a table of M = 1..128: ours, % of copy bandwidth, bf16 cuBLAS, bitsandbytes, the config used). Most of the
time is Triton/Gluon compiling. A failing item prints its error and the script goes on; the last line sums up.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from loraplex.server.nf4 import ops, reference
from loraplex.server.nf4.format import NF4Weight
from loraplex.server.nf4.kernel_config import KernelConfig, fit

T0 = time.time()
FAILURES: list[str] = []
CONFIGS = {  # every kernel family; fitted per call (dtype, shape) as ops does
    "gemv": KernelConfig("gemv", block_m=2, block_n=16, block_k=512, num_warps=4, num_stages=2),
    "swap-split8": KernelConfig("gemm", block_m=16, block_n=128, block_k=128, swap_ab=True, split_k=8),
    "swap-tableload-split2": KernelConfig("gemm", block_m=16, block_n=128, block_k=128, swap_ab=True, split_k=2,
                                          decode_asm=False),
    "gemm-128": KernelConfig("gemm", block_m=128, block_n=128, block_k=128, num_warps=8),
    "lut-kw8": KernelConfig("lut", block_m=8, block_n=16, block_k=256, num_warps=8, k_warps=8),
    "lut-kw2-m16-split4": KernelConfig("lut", block_m=16, block_n=64, block_k=256, split_k=4, num_warps=8, k_warps=2,
                                       max_regs=128),
    "lut-shfl": KernelConfig("lut", block_m=8, block_n=32, block_k=256, num_warps=8, k_warps=4, lut="shfl"),
    "lut-m64": KernelConfig("lut", block_m=64, block_n=64, block_k=64, num_warps=8, k_warps=2, max_regs=128),
    "dequant_mm": KernelConfig("dequant_mm"),
}
SHAPES_8B = {"qkv": ((4096, 1024, 1024), 4096), "o": ((4096,), 4096), "gate_up": ((14336, 14336), 4096),
             "down": ((4096,), 14336)}
SHAPES_SMOL = {"smol_qkv": ((576, 192, 192), 576), "smol_gate_up": ((1536, 1536), 576), "smol_down": ((576,), 1536)}
TUNE_SHAPES = [("linear", 6144, 4096), ("linear", 4096, 4096), ("linear", 28672, 4096), ("gate_up_silu", 28672, 4096),
               ("linear", 4096, 14336), ("linear", 1024, 4096), ("linear", 14336, 4096)]  # Llama-3.1-8B
TUNE_BUCKETS = (1, 8, 16, 32, 64, 128)  # 2 and 4 take bucket 8's entry (same LUT tile)


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def item(name: str, fn) -> None:
    """Run one check; print PASS/FAIL (with the error) and go on."""
    try:
        detail = fn()
        log(f"PASS {name}" + (f"  {detail}" if detail else ""))
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the script
        FAILURES.append(name)
        log(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}")
        traceback.print_exc(limit=3)


def make_weight(segments, k, dtype=torch.bfloat16, seed=0) -> NF4Weight:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return NF4Weight.quantize([(torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype) for n in segments])


def rel_err(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def twin(x, w, gated=False):
    y = x.float() @ reference.dequantize(w, x.dtype).float().t()
    if gated:
        g, u = y.split(w.out_features // 2, dim=-1)
        y = torch.nn.functional.silu(g) * u
    return y


def run(x, w, gated, cfg, **kw):
    from loraplex.server.nf4 import triton_kernels as tk

    n_out = w.out_features // 2 if gated else w.out_features
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return tk.matmul(x, w, None, gated, fit(cfg, x.shape[0], n_out, w.in_features, x.element_size(), gated, sms),
                     **kw)


def phase_check() -> None:
    """~45 s, mostly compiles; every config fitted per call as ops does."""
    import copy

    import bitsandbytes.functional as bnbf

    from loraplex.server.nf4 import triton_kernels as tk

    w_qkv = make_weight(*SHAPES_8B["qkv"], seed=1)

    def dequant_check():
        bad = []
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            out = torch.full(w_qkv.shape, float("nan"), dtype=dt, device="cuda")
            tk.dequantize(w_qkv, dt, out=out)
            for s in range(w_qkv.num_segments):
                qs = copy.copy(w_qkv.segment_quant_state(s))
                qs.dtype = dt
                ref = bnbf.dequantize_4bit(w_qkv.segment_packed(s), qs)
                r0, n = w_qkv.row_starts[s], w_qkv.segment_rows[s]
                if mism := int((out[r0:r0 + n] != ref).sum()):
                    bad.append(f"{dt} seg{s}: {mism} mismatches")
        assert not bad, "; ".join(bad)
    item("dequant == bnb  qkv -> bf16/fp16/fp32", dequant_check)

    w_smol = make_weight(*SHAPES_SMOL["smol_qkv"], seed=2)
    for cname, cfg in CONFIGS.items():
        if cname in ("gemm-128", "swap-tableload-split2", "dequant_mm"):
            continue

        def one_hot(cfg=cfg, w=w_smol if cfg.kernel != "lut" else w_qkv):
            m, k = 7, w.in_features
            cols = torch.randint(0, k, (m,), device="cuda")
            scale = 2.0 ** torch.randint(-2, 3, (m,), device="cuda").float()
            x = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
            x[torch.arange(m, device="cuda"), cols] = scale.to(torch.bfloat16)
            out = torch.full((m, w.out_features), float("nan"), dtype=torch.bfloat16, device="cuda")
            ws = torch.full((8 * m * w.out_features,), float("nan"), device="cuda")
            run(x, w, False, cfg, out=out, workspace=ws)
            if cfg.kernel == "lut":  # the code is rounded, then scaled by the absmax in fp32
                vals = reference.linear_factored(torch.eye(k, device="cuda", dtype=torch.bfloat16)[cols], w)
            else:
                vals = reference.dequantize(w, torch.bfloat16)[:, cols].t().float()
            expect = (vals * scale[:, None]).bfloat16()
            assert torch.equal(out, expect), f"{int((out != expect).sum())} of {out.numel()} differ"
        item(f"matmul one-hot exact bf16  {cname}", one_hot)

    weights = {"qkv": w_qkv, "down": make_weight(*SHAPES_8B["down"], seed=3),
               "gate_up": make_weight(*SHAPES_8B["gate_up"], seed=3),
               "smol_down": make_weight(*SHAPES_SMOL["smol_down"], seed=3)}
    for cname, cfg in CONFIGS.items():
        def parity(cfg=cfg):
            errs = []
            lut = cfg.kernel == "lut"
            for wname in ("qkv", "down", "smol_down") if lut else ("qkv",):
                w = weights[wname]
                for m in (1, cfg.block_m) if lut else (1, 16, 128):
                    x = torch.randn(m, w.in_features, device="cuda", dtype=torch.bfloat16)
                    e = rel_err(run(x, w, False, cfg), twin(x, w))
                    errs.append(e)
                    assert e <= (5e-3 if lut else 8e-3), f"{wname} M={m}: rel err {e:.3g}"
            x = torch.randn(5, 4096, device="cuda", dtype=torch.bfloat16)
            eg = rel_err(run(x, weights["gate_up"], True, cfg), twin(x, weights["gate_up"], gated=True))
            assert eg <= 2.4e-2, f"gated rel err {eg:.3g}"
            return f"max rel err {max(errs):.2e}, gated {eg:.2e}"
        item(f"matmul vs twin bf16 ({'qkv/down/smol down' if cfg.kernel == 'lut' else 'qkv'}; gated)  {cname}", parity)

    def fp_dtypes():
        w32 = make_weight(*SHAPES_8B["o"], dtype=torch.float32, seed=4)
        w16 = make_weight(*SHAPES_8B["o"], dtype=torch.float16, seed=4)
        x16 = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
        e16 = rel_err(run(x16, w16, False, CONFIGS["lut-kw8"]), twin(x16, w16))
        assert e16 <= 1e-3, f"fp16 LUT rel err {e16:.3g}"
        wg = make_weight(*SHAPES_8B["gate_up"], dtype=torch.float32, seed=5)
        dense32 = reference.dequantize(w32, torch.float32).double()
        errs = []
        for m in (1, 64, 128):  # what failed on the first run: fp32 through ops (tuned table, now fitted)
            x = torch.randn(m, 4096, device="cuda")
            errs.append(rel_err(ops.linear(x, w32), x.double() @ dense32.t()))
            assert errs[-1] <= 1e-5, f"ops fp32 M={m}: {errs[-1]:.3g}"
            assert torch.isfinite(ops.linear_gate_up_silu(x, wg)).all()
        return f"fp16 LUT {e16:.1e}, fp32 ops {max(errs):.1e}"
    item("fp16 LUT parity; fp32 ops (fitted configs) at M 1/64/128 incl. gate_up", fp_dtypes)

    def determinism_and_graphs():
        w, g = weights["qkv"], weights["gate_up"]
        for m in (1, 16, 64, 200):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            eager = (ops.linear(x, w), ops.linear_gate_up_silu(x, g))
            again = (ops.linear(x, w), ops.linear_gate_up_silu(x, g))
            assert all(torch.equal(a, b) for a, b in zip(eager, again)), f"M={m}: run-to-run differs"
            if m > 128:
                continue
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = (ops.linear(x, w), ops.linear_gate_up_silu(x, g))
            for t in captured:
                t.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(eager, captured)), f"M={m}: graph replay != eager"
    item("ops determinism + CUDA-graph replay == eager (M 1..200)", determinism_and_graphs)


def phase_tune(out: Path, budget_s: float, shapes: list, buckets: tuple[int, ...]) -> dict | None:
    from loraplex.server.nf4 import tuning

    try:
        result = tuning.tune(shapes, buckets, out_path=out / tuning.config_path(
            torch.cuda.get_device_name()).name, deadline=time.time() + budget_s, log=log)
    except Exception as exc:  # noqa: BLE001
        FAILURES.append("tune")
        log(f"FAIL tune: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return None
    tuning.use_table(result["configs"])
    return result


def phase_bench(out: Path, ms: tuple[int, ...]) -> None:
    from loraplex.server.bench.cli import environment
    from loraplex.server.bench.kernels import LLAMA_8B_NF4_SHAPES, KernelsBenchConfig, run_kernels_bench
    from loraplex.server.nf4 import tuning
    from loraplex.server.nf4.tuning import _short

    cfg = KernelsBenchConfig(ms=ms)
    env = environment("cuda")
    report = {"benchmark": "kernels", "config": {"ms": list(ms)}, "environment": env}
    report.update(run_kernels_bench(cfg, log=log))
    path = out / f"kernels-{env['device_slug']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    log(f"wrote {path}")
    rows = {(r["kernel"], r["m"], r["impl"]): r for r in report["rows"]}
    shapes = {name: (op, sum(seg), k) for name, op, seg, k in LLAMA_8B_NF4_SHAPES}

    def cell(r, width=13):
        return f"{'-':>{width}}" if not r or r["us"] is None else f"{r['us']:6.1f} ({100 * r['bw_share']:3.0f}%)"

    print(f"\ncopy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s; us per call (share of copy bandwidth)",
          flush=True)
    for kernel in dict.fromkeys(r["kernel"] for r in report["rows"]):
        op, n_rows, k = shapes.get(kernel, ("linear", 0, 0))
        print(f"{kernel} [{n_rows}x{k}]\n     M |  loraplex     | cuBLAS bf16   | bitsandbytes  | vs cuBLAS | config",
              flush=True)
        for m in ms:
            ours, dense, bnb = (rows.get((kernel, m, i)) for i in ("loraplex", "cublas_bf16", "bitsandbytes"))
            speed = (f"{dense['us'] / ours['us']:8.2f}x" if ours and dense and ours["us"] and dense["us"]
                     else f"{'-':>9}")
            used = _short(tuning.lookup("gate_up_silu" if op == "gate_up_silu" else "linear", n_rows, k, m,
                                        torch.device("cuda"))) if n_rows else ""
            print(f"  {m:4d} | {cell(ours)} | {cell(dense)} | {cell(bnb)} | {speed} | {used}", flush=True)
    print(json.dumps(report["summary"], indent=1), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--phases", default="check,tune,bench")
    parser.add_argument("--tune-budget-s", type=float, default=100.0, help="tuning stops starting new entries after")
    parser.add_argument("--ms", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--tune-buckets", default=",".join(map(str, TUNE_BUCKETS)),
                        help="M buckets to re-time; the others keep the committed file's entries")
    parser.add_argument("--tune-shapes", default=None,
                        help="indices into TUNE_SHAPES to re-time (comma-separated; default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    log(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}")
    phases = args.phases.split(",")
    if "check" in phases:
        phase_check()
    if "tune" in phases:
        shapes = (TUNE_SHAPES if args.tune_shapes is None
                  else [TUNE_SHAPES[int(i)] for i in args.tune_shapes.split(",")])
        phase_tune(out, args.tune_budget_s, shapes, tuple(int(b) for b in args.tune_buckets.split(",")))
    if "bench" in phases:
        try:
            phase_bench(out, tuple(int(m) for m in args.ms.split(",")))
        except Exception as exc:  # noqa: BLE001
            FAILURES.append("bench")
            log(f"FAIL bench: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    log(f"done: {len(FAILURES)} failures" + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
