"""`loraplex bench kernels`: per-kernel time over M and its share of the GPU's memory bandwidth, beside baselines.

A small registry of row producers: each family (NF4 here; LoRA and attention can add theirs with
`@register("lora")`) yields one dict per (kernel, shape, M, implementation):
    {"family", "kernel", "op", "shape", "m", "impl", "us", "bytes", "gbs", "bw_share", "timing", "error"}
(NF4 rows of ours add "config": the kernel config ops chose, tuned or heuristic.)
`bytes` is what the op must move at least (weights + statistics + activations + output), `bw_share` is
bytes / time over the measured device-to-device copy bandwidth. Times are medians over CUDA-graph replays
(eager when a library cannot be captured) with inputs rotated so the L2 cannot serve them.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..nf4 import ops as nf4_ops
from ..nf4.format import NF4Weight
from ..nf4.timing import copy_bandwidth_gbs, rotations, time_per_call_us

LLAMA_8B_NF4_SHAPES: tuple[tuple[str, str, tuple[int, ...], int], ...] = (
    # (name, op, segment rows, K) of Llama-3.1-8B's linears: fused and unfused
    ("qkv", "linear", (4096, 1024, 1024), 4096),
    ("q|o", "linear", (4096,), 4096),
    ("k|v", "linear", (1024,), 4096),
    ("gate_up", "linear", (14336, 14336), 4096),
    ("gate_up_silu", "gate_up_silu", (14336, 14336), 4096),
    ("gate|up", "linear", (14336,), 4096),
    ("down", "linear", (4096,), 14336),
)


@dataclass(frozen=True, slots=True)
class KernelsBenchConfig:
    ms: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    """Rows of x (tokens) per call."""
    families: tuple[str, ...] = ("nf4",)
    dtype: str = "bfloat16"
    device: str = "cuda"
    baselines: bool = True
    """Also time bitsandbytes and bf16 cuBLAS on the same shapes."""


RowFn = Callable[[KernelsBenchConfig, float], Iterator[dict]]
REGISTRY: dict[str, RowFn] = {}


def register(family: str) -> Callable[[RowFn], RowFn]:
    """Register a producer of rows for `family` (called with the config and the copy bandwidth in GB/s)."""
    def deco(fn: RowFn) -> RowFn:
        REGISTRY[family] = fn
        return fn
    return deco


def row(family: str, kernel: str, op: str, shape: str, m: int, impl: str, nbytes: int, copy_gbs: float,
        timed: Callable[[], tuple[float, str]]) -> dict:
    """Time one implementation; a failure becomes a row with its error instead of stopping the benchmark."""
    out = {"family": family, "kernel": kernel, "op": op, "shape": shape, "m": m, "impl": impl, "bytes": nbytes,
           "us": None, "gbs": None, "bw_share": None, "timing": None, "error": None}
    try:
        us, mode = timed()
        gbs = nbytes / (us * 1e-6) / 1e9
        out.update(us=round(us, 2), gbs=round(gbs, 1), bw_share=round(gbs / copy_gbs, 3), timing=mode)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
    return out


def _copies(w: NF4Weight, n: int) -> list[NF4Weight]:
    return [w] + [NF4Weight(**{f: t.clone() for f, t in w.tensors().items()}, in_features=w.in_features,
                            segment_rows=w.segment_rows, dtype=w.dtype) for _ in range(n - 1)]


@register("nf4")
def nf4_rows(cfg: KernelsBenchConfig, copy_gbs: float,
             shapes: tuple = LLAMA_8B_NF4_SHAPES) -> Iterator[dict]:
    """Ours (ops.linear / ops.linear_gate_up_silu, tuned configs) beside bitsandbytes.matmul_4bit (one call per
    segment, as the unfused model does) and bf16 cuBLAS (F.linear on the dequantized fused weight)."""
    import bitsandbytes as bnb

    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, op, seg_rows, k in shapes:
        gated = op == "gate_up_silu"
        base = NF4Weight.quantize([torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5
                                   for n in seg_rows])
        n_out = base.out_features // 2 if gated else base.out_features
        shape = f"{'+'.join(map(str, seg_rows))}x{k}"
        n_w = rotations(base.nbytes, device)
        weights = _copies(base, n_w)
        states = [[(w.segment_packed(s), w.segment_quant_state(s)) for s in range(w.num_segments)] for w in weights]
        dense_n = rotations(base.out_features * k * dtype.itemsize, device) if cfg.baselines else 0
        dense = [nf4_ops.dequantize(base, dtype) for _ in range(dense_n)]
        for m in cfg.ms:
            xs = [torch.randn(m, k, device=device, dtype=dtype, generator=gen) for _ in range(max(n_w, dense_n))]
            act = (m * k + m * n_out) * dtype.itemsize
            fn = nf4_ops.linear_gate_up_silu if gated else nf4_ops.linear
            ours = row("nf4", name, op, shape, m, "loraplex", base.nbytes + act, copy_gbs,
                       lambda: time_per_call_us(lambda i: fn(xs[i], weights[i]), n_w))
            ours["config"] = _config_used(op, base, m, dtype, device)
            yield ours
            if not cfg.baselines:
                continue

            def bnb_call(i: int) -> list[torch.Tensor]:
                outs = [bnb.matmul_4bit(xs[i], p.t(), quant_state=qs) for p, qs in states[i]]
                return [F.silu(outs[0]) * outs[1]] if gated else outs

            yield row("nf4", name, op, shape, m, "bitsandbytes", base.nbytes + act, copy_gbs,
                      lambda: time_per_call_us(bnb_call, n_w))

            def dense_call(i: int) -> torch.Tensor:
                y = F.linear(xs[i], dense[i])
                if gated:
                    gate, up = y.split(n_out, dim=-1)
                    return F.silu(gate) * up
                return y

            yield row("nf4", name, op, shape, m, "cublas_bf16", base.out_features * k * dtype.itemsize + act, copy_gbs,
                      lambda: time_per_call_us(dense_call, dense_n))
        torch.cuda.empty_cache()


def _config_used(op: str, w: NF4Weight, m: int, dtype: torch.dtype, device: torch.device) -> dict | None:
    """The launch config ops picked for this call (tuned table or heuristic, fitted), for the report."""
    try:
        from ..nf4 import tuning

        return tuning.lookup("gate_up_silu" if op == "gate_up_silu" else "linear", w.out_features, w.in_features, m,
                             device, dtype).to_dict()
    except Exception:  # noqa: BLE001 - informational only
        return None


FUSED = ("qkv", "gate_up", "gate_up_silu")


def summarize(rows: list[dict]) -> dict:
    """The issue's bar: NF4 share of bandwidth at M=1 per kernel, and ours vs bf16 cuBLAS for every (kernel, M)."""
    by_key = {(r["kernel"], r["m"], r["impl"]): r for r in rows if r["family"] == "nf4"}
    m1 = {k[0]: r["bw_share"] for k, r in by_key.items() if k[1] == 1 and k[2] == "loraplex"}
    speedups: dict[str, float] = {}
    for (kernel, m, impl), r in by_key.items():
        dense = by_key.get((kernel, m, "cublas_bf16"))
        if impl == "loraplex" and r["us"] and dense and dense["us"]:
            speedups[f"{kernel} M={m}"] = round(dense["us"] / r["us"], 2)
    fused = [v for k, v in speedups.items() if k.split()[0] in FUSED and int(k.rsplit("=", 1)[1]) <= 64]
    return {"nf4_bw_share_m1": m1, "nf4_min_bw_share_m1": min(m1.values(), default=None),
            "nf4_speedup_vs_cublas_bf16": speedups,
            "nf4_fused_faster_than_cublas_bf16_m_le_64": bool(fused) and all(v > 1 for v in fused)}


def run_kernels_bench(cfg: KernelsBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Every registered family's rows, the copy bandwidth they are measured against, and the summary."""
    copy_gbs = copy_bandwidth_gbs(device=cfg.device)
    log(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    rows = []
    for family in cfg.families:
        for r in REGISTRY[family](cfg, copy_gbs):
            rows.append(r)
            share = f"{100 * r['bw_share']:5.1f}%" if r["bw_share"] is not None else "   - "
            log(f"{r['family']:5s} {r['kernel']:13s} {r['shape']:22s} M={r['m']:4d} {r['impl']:13s} "
                f"{r['us'] if r['us'] is not None else float('nan'):9.1f} us {share} {r['error'] or ''}")
    return {"copy_bandwidth_gbs": round(copy_gbs, 1), "rows": rows, "summary": summarize(rows)}
