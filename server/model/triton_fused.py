"""Triton kernels for the per-layer elementwise work of a decoder layer: RMSNorm (optionally after the residual
add) and rotary embedding of q and k, each one launch where the PyTorch twin (`fused.py`) launches 5-8.

Both round where PyTorch rounds for a bf16/fp16 model: the residual sum, x * rsqrt(mean(x^2) + eps) and the weight
product each rounded to the model dtype; rotary's x * cos, rotate_half(x) * sin and their sum each rounded. Only
the order of the fp32 sum of squares differs from torch's reduction. Launches are asynchronous, allocate through
torch only and take their grid from shapes, so CUDA graphs capture them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, H, stride_x, stride_r, stride_o, stride_s, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """One row: s = x (+ res, rounded; stored to sum), out = w * rnd(s * rsqrt(mean(s^2) + eps)), rounded."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    y = (xf * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight * rnd(s * rsqrt(mean(s^2) + eps)), s or None) with s = x (+ residual); rows of x [T, H]."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous()
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=torch.result_type(weight, x), device=x.device)
    summed = None
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
        summed = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows == 0:
        return out, summed
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x
    sums = summed if summed is not None else out
    _rms_norm_kernel[(rows,)](x, res, weight, out, sums, hidden, x.stride(0), res.stride(0), out.stride(0),
                              sums.stride(0), float(eps), HAS_RES=residual is not None, BLOCK=block,
                              num_warps=max(1, min(16, block // 256)))
    return out, summed


@triton.jit
def _rotary_kernel(src_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, stride_src, stride_cos, stride_sin, HQ,
                   HALF: tl.constexpr, BLOCK: tl.constexpr):
    """One (token, head): heads < HQ are q's (into q [T, HQ, D]), the rest k's (into k [T, HK, D]); HK = the
    grid's second dimension - HQ. out = rnd(rnd(x * cos) + rnd(rotate_half(x) * sin))."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hk = tl.num_programs(1) - HQ
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    src = src_ptr + t * stride_src + h * (2 * HALF)
    dtype = src_ptr.dtype.element_ty
    x1 = tl.load(src + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_cos + i, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_cos + HALF + i, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_sin + i, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_sin + HALF + i, mask=mask, other=0.0).to(tl.float32)
    o1 = ((x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
    if h < HQ:
        dst = q_ptr + (t * HQ + h) * (2 * HALF)
    else:
        dst = k_ptr + (t * hk + (h - HQ)) * (2 * HALF)
    tl.store(dst + i, o1, mask=mask)
    tl.store(dst + HALF + i, o2, mask=mask)


def rotary_qk(qk: torch.Tensor, num_q_heads: int, num_k_heads: int, head_dim: int, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qk: [T, >= (Hq + Hk) * D] (q heads then k heads, e.g. the fused q|k|v output) -> rotated q [T, Hq, D] and
    k [T, Hk, D], contiguous; cos, sin: [T, D]."""
    tokens = qk.shape[0]
    assert qk.stride(1) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1 and head_dim % 2 == 0
    q = torch.empty(tokens, num_q_heads, head_dim, dtype=qk.dtype, device=qk.device)
    k = torch.empty(tokens, num_k_heads, head_dim, dtype=qk.dtype, device=qk.device)
    if tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(tokens, num_q_heads + num_k_heads)](qk, cos, sin, q, k, qk.stride(0), cos.stride(0),
                                                        sin.stride(0), num_q_heads, HALF=half,
                                                        BLOCK=triton.next_power_of_2(half), num_warps=1)
    return q, k
