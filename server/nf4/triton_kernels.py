"""Launchers of the NF4 Triton kernels (dequantize, GEMV, GEMM, LUT, split-K reduction) for one KernelConfig.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests; not the Gluon LUT kernel). Launches
allocate only through torch (output, split-K workspace), never synchronize, and are deterministic: CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from . import reference
from .format import NF4Weight
from .kernel_config import LUT_MAX_GATED_M, KernelConfig
from .triton_common import reduce_kernel
from .triton_dequant import TORCH_TO_TL, dequantize, segment_args, use_asm
from .triton_gemm import gemm_kernel
from .triton_gemv import gemv_kernel

__all__ = ["dequantize", "matmul"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, gated: bool, cfg: KernelConfig,
           out: torch.Tensor | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias): [M, K] -> [M, N]; gated: silu(x Wg^T + bg) * (x Wu^T + bu) -> [M, N / 2].

    x: [M, K] bf16/fp16/fp32 with unit stride along K; W dequantized to x.dtype (bitsandbytes' values);
    fp32 accumulation; output x.dtype. Needs w.kernel_ok; gated needs two equal segments (gate, up).
    out ([M, N_out], contiguous) and workspace (fp32, >= split * M * N elements) are used when given
    (tests poison them); otherwise allocated through torch.
    """
    assert w.kernel_ok and x.dim() == 2 and x.shape[1] == w.in_features and x.stride(1) == 1
    if gated:
        reference.check_gate_up(w)
    M, K = x.shape
    n_rows = w.out_features
    n_out = n_rows // 2 if gated else n_rows
    if cfg.kernel == "dequant_mm":
        y = F.linear(x, dequantize(w, x.dtype), bias)
        if gated:
            gate, up = y.split(n_out, dim=-1)
            y = F.silu(gate) * up
        return y if out is None else out.copy_(y)
    if cfg.kernel == "lut" and gated and cfg.block_m > LUT_MAX_GATED_M:
        # the plain LUT matmul of the fused weight, then the epilogue (rounded like `triton_common.finish`)
        gate, up = matmul(x, w, bias, False, cfg, workspace=workspace).split(n_out, dim=-1)
        y = F.silu(gate) * up
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    assert out.shape == (M, n_out) and out.dtype == x.dtype and out.is_contiguous()
    if M == 0:
        return out
    if cfg.kernel == "lut":
        split = cfg.split_k
        k_split = K // split
    else:
        k_split = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
        split = triton.cdiv(K, k_split)
    part = out
    if split > 1:
        part = workspace if workspace is not None else torch.empty(split * M * n_rows, dtype=torch.float32,
                                                                   device=x.device)
        assert part.dtype == torch.float32 and part.numel() >= split * M * n_rows
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(n_out, cfg.block_n), split)
    out_dtype = TORCH_TO_TL[x.dtype]
    common = (x, out, part, out if bias is None else bias, w.packed, w.absmax_q, w.absmax2, w.code2, w.offset,
              w.code, M, n_out, n_rows, n_out if gated else 0, K, x.stride(0), k_split, int(split > 1),
              *segment_args(w, unit_rows=True))
    flags = dict(GATED=gated, HAS_BIAS=bias is not None, OUT_DTYPE=out_dtype, EXACT=x.is_cuda,
                 ASM=use_asm(x, x.dtype, cfg.decode_asm), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kernel == "lut":
        _lut(common, x, w, cfg, gated, bias is not None, n_out, K, split)
    elif cfg.kernel == "gemv":
        gemv_kernel[grid](*common, BM=cfg.block_m, BN=cfg.block_n, NB=cfg.block_k // 64, **flags)
    else:
        gemm_kernel[grid](*common, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, SWAP_AB=cfg.swap_ab,
                          INPUT_PRECISION="ieee" if x.dtype == torch.float32 else None, **flags)
    if split > 1:
        bm = min(_next_pow2(M), 16)
        bn = 256 if x.is_cuda else 64
        reduce_kernel[(triton.cdiv(M, bm), triton.cdiv(n_out, bn))](
            part, out, out if bias is None else bias, M, n_out, n_rows, n_out if gated else 0, split, BM=bm, BN=bn,
            GATED=gated, HAS_BIAS=bias is not None, OUT_DTYPE=out_dtype, num_warps=4)
    return out



def _lut(common: tuple, x: torch.Tensor, w: NF4Weight, cfg: KernelConfig, gated: bool, has_bias: bool, n_out: int,
         K: int, split: int) -> None:
    """The Gluon LUT kernel (CUDA, bf16/fp16 x with M <= block_m, K tiled exactly: see kernel_config.fit)."""
    from . import gluon_lut

    kw, wn, nb = cfg.k_warps, cfg.num_warps // cfg.k_warps, cfg.block_k // 64
    rt = cfg.block_n // (16 * wn)
    assert x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] <= cfg.block_m
    assert K % (64 * nb * kw * split) == 0, (K, cfg)
    lds = cfg.lut == "lds"
    q_vec = nb if kw == 1 and (K // 64) % nb == 0 and w.absmax_q.data_ptr() % 4 == 0 else 1
    grid = (triton.cdiv(n_out, cfg.block_n), split)
    gluon_lut.lut_kernel[grid](*common, KW=kw, WN=wn, RT=rt, NB=nb, BMP=cfg.block_m,
                               GATED=gated, HAS_BIAS=has_bias, LDS=lds, QV=q_vec,
                               **gluon_lut.layouts(kw, wn, rt, nb, cfg.block_m), num_warps=cfg.num_warps,
                               **({"maxnreg": cfg.max_regs} if cfg.max_regs else {}))
