"""Tuned launch configs: per-GPU JSON files in configs/, looked up at run time, written once by `tune`.

File `configs/<GPU name, spaces as _>.json`:
    {"device": "NVIDIA H200", "triton": "3.6.0", "dtype": "bfloat16",
     "configs": {"linear": {"6144x4096": {"1": {KernelConfig fields}, "2": ...}}, "gate_up_silu": {...}}}
keyed by op, "<weight rows N>x<K>" and M bucket (kernel_config.M_BUCKETS), tuned for "dtype" (2-byte activations:
fp16 uses the entries as they are). Every entry is passed through `kernel_config.fit` for the call's dtype and M,
so fp32 never meets a config that overflows shared memory. A missing file or entry falls back to
`kernel_config.default_config`; M above the last bucket always dequantizes into cuBLAS.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch

from .kernel_config import (KernelConfig, default_config, fill_split, fit, lut_blocks_per_step, lut_max_regs,
                            m_bucket)

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
OPS = ("linear", "gate_up_silu")
_override: dict | None = None
"""A configs table used instead of the files (set by `use_table`: tools that tune, then benchmark)."""


def config_path(device_name: str, folder: Path = CONFIG_DIR) -> Path:
    return folder / f"{device_name.replace(' ', '_')}.json"


@lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[dict, str, int]:
    """(configs table of this GPU's file or {}, the dtype it was tuned for, number of SMs)."""
    props = torch.cuda.get_device_properties(index)
    path = config_path(props.name)
    table, dtype = {}, "bfloat16"
    if _override is not None:
        table = _override
    elif path.exists():
        data = json.loads(path.read_text())
        table, dtype = data.get("configs", {}), data.get("dtype", dtype)
        logger.info("NF4 kernel configs from %s", path)
    return table, dtype, props.multi_processor_count


@lru_cache(maxsize=4096)
def _lookup(op: str, n_rows: int, k: int, bucket: int, m: int, index: int, elem_bytes: int) -> KernelConfig:
    table, _, num_sms = _device_info(index)
    gated = op == "gate_up_silu"
    n_out = n_rows // 2 if gated else n_rows
    entry = table.get(op, {}).get(f"{n_rows}x{k}", {}).get(str(bucket))
    if entry is not None:
        # tuned for 2-byte activations: fp16 takes the bf16 entry as it is, fp32 gets it fitted
        return fit(KernelConfig(**entry), m, n_out, k, elem_bytes, gated, num_sms)
    return default_config(m, n_out, k, num_sms, elem_bytes, gated)


def lookup(op: str, n_rows: int, k: int, m: int, device: torch.device,
           dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """The config for `op` on a [n_rows, k] weight with m rows of x in `dtype`, on a CUDA device (no host sync).

    Always one that runs: `kernel_config.fit` keeps it within shared memory and the kernel's dtype/shape limits."""
    bucket = m_bucket(m)
    if bucket is None:
        return KernelConfig(kernel="dequant_mm")
    index = device.index if device.index is not None else torch.cuda.current_device()
    # tuned entries depend on the bucket, fitted ones on m too (the LUT tile must hold m rows)
    return _lookup(op, n_rows, k, bucket, m, index, dtype.itemsize)


def clear_cache() -> None:
    """Forget loaded files (after `tune` wrote one)."""
    _device_info.cache_clear()
    _lookup.cache_clear()


def use_table(configs: dict | None) -> None:
    """Look configs up in `configs` (a file's "configs" dict) instead of the files; None: back to the files."""
    global _override
    _override = configs
    clear_cache()


# ------------------------------------------------------------------------------------------ tuning
def _lut_candidates(bucket: int, n_out: int, k: int, num_sms: int, gated: bool) -> list[KernelConfig]:
    """LUT configs (8 warps): K split 8 or 2 ways among the warps (16 or 64 rows per program) with the heuristic's
    blocks per step, at 8 rows of x also 4-way and half the blocks (64 registers: three programs per SM), each
    with the grid split-K reaching ~3 programs per SM and half that; the shuffle decoder once (M = 1). Few
    distinct compiles: each costs seconds on the device."""
    bm = max(8, bucket)
    nb = lut_blocks_per_step(bm, gated)
    shapes = [(8, nb), (2, nb)] + ([(4, nb), (8, nb // 2)] if bm == 8 and nb > 1 else [])
    out = []
    for kw, blocks in shapes:
        wn = 8 // kw
        base = KernelConfig(kernel="lut", block_m=bm, block_n=16 * wn, block_k=64 * blocks, num_warps=8,
                            k_warps=kw, max_regs=lut_max_regs(bm, gated, kw) if blocks == nb else 0)
        unit = base.block_k * kw
        if k % unit:
            continue
        tiles = -(-n_out // base.block_n)
        split = 1
        while tiles * split < 3 * num_sms and (k // unit) % (split * 2) == 0:
            split *= 2
        for s in sorted({split, max(1, split // 2)}):
            out.append(replace(base, split_k=s))
    if out and bucket == 1:
        out.append(replace(out[0], lut="shfl"))
    return out


def candidates(bucket: int, n_out: int, k: int, num_sms: int, elem_bytes: int = 2,
               gated: bool = False) -> list[KernelConfig]:
    """Configs worth timing for one (M bucket, shape), all fitted (valid and within shared memory for this dtype):
    the LUT kernel up to M = 64 (bf16/fp16), the tl.dot swap-AB tile that won most entries of the first H200 run
    (with the split-K filling the GPU and half of it), the FMA GEMV at M <= 2, plain tiles and dequantize +
    cuBLAS from M = 64."""
    tiles: list[dict] = []
    if bucket <= 2:
        tiles.append(dict(kernel="gemv", block_m=bucket, block_n=16, block_k=512, num_warps=4, num_stages=2))
    if bucket <= 64:
        tiles.append(dict(kernel="gemm", block_m=max(16, bucket), block_n=128, block_k=128, swap_ab=True,
                          num_warps=4, num_stages=3))
    if bucket >= 64:
        tiles.append(dict(kernel="gemm", block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3))
        tiles.append(dict(kernel="dequant_mm"))
    out: list[KernelConfig] = []
    if elem_bytes == 2 and bucket <= 64:
        out += _lut_candidates(bucket, n_out, k, num_sms, gated)
    for tile in tiles:
        cfg = KernelConfig(**tile)
        if cfg.kernel == "dequant_mm":
            out.append(cfg)
            continue
        programs = -(-bucket // cfg.block_m) * -(-n_out // cfg.block_n)
        fill = fill_split(programs, k, cfg.block_k, num_sms)
        for split in sorted({max(1, fill // 2), fill}):
            if k // split >= 2 * cfg.block_k:
                out.append(replace(cfg, split_k=split))
    fitted = []
    for cfg in out:
        cfg = fit(cfg, bucket, n_out, k, elem_bytes, gated, num_sms)
        if cfg not in fitted:
            fitted.append(cfg)
    return fitted


def _error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def tune(shapes: Sequence[tuple[str, int, int]], buckets: Sequence[int], dtype: torch.dtype = torch.bfloat16,
         device: str = "cuda", out_path: Path | None = None, top_gated: int = 2, max_rel_err: float = 2e-2,
         deadline: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Time the candidates of every (op, N rows, K) x M bucket on this GPU, keep the fastest correct one, write JSON.

    shapes: ("linear" | "gate_up_silu", N rows of the fused weight, K). A candidate whose output is off the
    twin (dequantize + matmul in fp32) by more than max_rel_err is reported and skipped. gate_up_silu times the
    top `top_gated` configs of "linear" on the same shape (run "linear" first). Buckets of M_BUCKETS left out of
    `buckets` take the entry of the next larger tuned bucket (valid for fewer rows). Past `deadline`
    (time.time()) the remaining entries are left to the heuristic. Returns the file's dict.
    """

    import triton

    from . import reference, triton_kernels  # the kernels need triton: imported only when tuning
    from .format import NF4Weight
    from .kernel_config import M_BUCKETS
    from .timing import rotations, time_per_call_us

    props = torch.cuda.get_device_properties(device)
    num_sms = props.multi_processor_count
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    result = {"device": props.name, "triton": triton.__version__, "torch": torch.__version__,
              "dtype": str(dtype).removeprefix("torch."), "configs": _previous_configs(props.name, dtype)}
    timings: dict[tuple, list[tuple[float, KernelConfig]]] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for op, n_rows, k in shapes:
        gated = op == "gate_up_silu"
        seg = [n_rows // 2, n_rows // 2] if gated else [n_rows]
        base = NF4Weight.quantize([torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5
                                   for n in seg])
        n_w = rotations(base.nbytes, device)
        weights = [base] + [NF4Weight(**{f: t.clone() for f, t in base.tensors().items()}, in_features=k,
                                      segment_rows=base.segment_rows, dtype=base.dtype) for _ in range(n_w - 1)]
        dense = reference.dequantize(base, torch.float32)
        n_out = n_rows // 2 if gated else n_rows
        entries = result["configs"].setdefault(op, {}).setdefault(f"{n_rows}x{k}", {})
        for bucket in buckets:
            if deadline is not None and time.time() > deadline:
                log(f"  deadline: {op} {n_rows}x{k} M={bucket} left to the heuristic")
                continue
            xs = [torch.randn(bucket, k, device=device, dtype=dtype, generator=gen) for _ in range(n_w)]
            ref = xs[0].float() @ dense.t()
            if gated:
                ref = torch.nn.functional.silu(ref[:, :n_out]) * ref[:, n_out:]
            cands = candidates(bucket, n_out, k, num_sms, elem_bytes, gated)
            if gated:
                ranked = [fit(c, bucket, n_out, k, elem_bytes, True, num_sms)
                          for _, c in sorted(timings.get(("linear", n_rows, k, bucket), []), key=lambda t: t[0])]
                cands = list(dict.fromkeys(ranked[:top_gated])) or cands
            rows = []
            for cfg in cands:
                try:
                    err = _error(triton_kernels.matmul(xs[0], base, None, gated, cfg), ref)
                    if not err <= max_rel_err:
                        log(f"  skip {op} {n_rows}x{k} M={bucket} {cfg}: rel err {err:.3g}")
                        continue
                    us, _ = time_per_call_us(
                        lambda i, c=cfg: triton_kernels.matmul(xs[i], weights[i], None, gated, c), n_w)
                    rows.append((us, cfg))
                except Exception as exc:  # noqa: BLE001 - a config that fails to compile or run is skipped
                    log(f"  fail {op} {n_rows}x{k} M={bucket} {cfg}: {type(exc).__name__}: {str(exc)[:300]}")
            if not rows:
                continue
            rows.sort(key=lambda t: t[0])
            timings[(op, n_rows, k, bucket)] = rows
            best_us, best = rows[0]
            entries[str(bucket)] = best.to_dict()
            others = ", ".join(f"{us:.1f} {_short(c)}" for us, c in rows[1:4])
            log(f"{op:12s} {n_rows:6d}x{k:<6d} M={bucket:4d}: {best_us:8.1f} us  {_short(best)}  (next: {others}; "
                f"{len(rows)} timed)")
        tuned = sorted(int(b) for b in entries)
        for bucket in M_BUCKETS:  # untuned buckets take the next larger tuned one's config
            larger = [b for b in tuned if b > bucket]
            if str(bucket) not in entries and larger:
                entries[str(bucket)] = entries[str(larger[0])]
        torch.cuda.empty_cache()
    path = out_path or config_path(props.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    log(f"wrote {path}")
    clear_cache()
    return result


def _previous_configs(device_name: str, dtype: torch.dtype) -> dict:
    """The committed file's entries for this GPU and dtype: a partial re-tune (buckets left out, a deadline)
    replaces only what it timed, so entries it did not reach keep their tuned value, not the heuristic's."""
    path = config_path(device_name)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("configs", {}) if data.get("dtype") == str(dtype).removeprefix("torch.") else {}


def _short(cfg: KernelConfig) -> str:
    """A config in a few characters, for logs: kernel, tiles, split, warps (and the LUT's K warps / decoder)."""
    if cfg.kernel == "dequant_mm":
        return "dequant_mm"
    text = f"{cfg.kernel} m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps}"
    if cfg.kernel == "lut":
        return text + f" kw{cfg.k_warps} {cfg.lut}" + (f" r{cfg.max_regs}" if cfg.max_regs else "")
    return text + (" swap" if cfg.swap_ab else "") + f" st{cfg.num_stages}" + ("" if cfg.decode_asm else " tab")
