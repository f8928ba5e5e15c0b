"""The seam for a decoder layer's elementwise work: RMSNorm (optionally fused with the residual add) and rotary
embedding of q and k. bf16/fp16 CUDA tensors take one Triton launch each (`triton_fused`); everything else (CPU,
fp32, where the model must match transformers bit for bit) runs the PyTorch twin below, which is also the oracle.
"""
from __future__ import annotations

import importlib

import torch

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _kernels(x: torch.Tensor):
    """The Triton module for half-precision CUDA tensors outside export tracing (imported on first use: triton is
    the `gpu` extra and a CPU process that never imports it stays free to run Triton's interpreter), else None."""
    if x.is_cuda and x.dtype in _KERNEL_DTYPES and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        return importlib.import_module(".triton_fused", __package__)
    return None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, same order of operations (bit-level parity in fp32)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., H]."""
    kernels = _kernels(x)
    if kernels is None or weight.dtype != x.dtype or x.stride(-1) != 1:
        return rms_norm_reference(x, weight, eps)
    out, _ = kernels.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) for [T, H] tensors; the sum rounded to x's dtype as torch rounds it."""
    kernels = _kernels(x)
    if (kernels is None or weight.dtype != x.dtype or residual.dtype != x.dtype or x.dim() != 2
            or x.stride(1) != 1 or residual.stride(1) != 1):
        summed = x + residual
        return rms_norm_reference(summed, weight, eps), summed
    out, summed = kernels.rms_norm(x, weight, eps, residual)
    return out, summed


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotate-half convention (HF Llama); cos, sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotary_qk(qkv: torch.Tensor, num_q_heads: int, num_k_heads: int, head_dim: int, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q [T, Hq, D] and k [T, Hk, D] from the first (Hq + Hk) * D columns of qkv [T, N] (q heads, then k)."""
    kernels = _kernels(qkv)
    if (kernels is not None and cos.dtype == qkv.dtype and sin.dtype == qkv.dtype and qkv.stride(1) == 1
            and cos.stride(1) == 1 and sin.stride(1) == 1):
        return kernels.rotary_qk(qkv, num_q_heads, num_k_heads, head_dim, cos, sin)
    tokens, q_cols = qkv.shape[0], num_q_heads * head_dim
    q = qkv[:, :q_cols].view(tokens, num_q_heads, head_dim)
    k = qkv[:, q_cols:q_cols + num_k_heads * head_dim].view(tokens, num_k_heads, head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
