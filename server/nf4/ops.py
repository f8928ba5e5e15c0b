"""The NF4 seam the model calls: Triton kernels on CUDA (config picked by M), the PyTorch twin elsewhere.

    linear(x, w, bias)[..., n]        = sum_k x[..., k] * W[n, k] + bias[n]
    linear_gate_up_silu(x, w)[..., i] = silu(x Wg^T)[..., i] * (x Wu^T)[..., i]     (w: gate rows, then up rows)
    dequantize(w, dtype)              = W: [N, K], bit-identical to bitsandbytes' dequantize_4bit

W[n, k] is bitsandbytes' dequantized value in x's dtype (see `format.NF4Weight`); sums in fp32. CUDA calls
never synchronize, allocate only through torch and are deterministic, so they can be captured in CUDA graphs.
"""
from __future__ import annotations

import logging

import torch

from . import reference
from .format import NF4Weight

logger = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _triton_ok(x: torch.Tensor, w: NF4Weight) -> bool:
    return x.is_cuda and w.packed.is_cuda and w.kernel_ok and x.dtype in _KERNEL_DTYPES


_FALLBACK: set = set()
"""(config, dtype, gated) that could not be launched here: they dequantize into cuBLAS instead."""


def _matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    from triton.runtime.errors import OutOfResources

    from . import triton_kernels, tuning  # triton is imported only on the CUDA path
    from .kernel_config import KernelConfig

    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    cfg = tuning.lookup("gate_up_silu" if gated else "linear", w.out_features, w.in_features, x2.shape[0], x.device,
                        x.dtype)
    key = (cfg, x.dtype, gated)
    if key in _FALLBACK:
        cfg = KernelConfig(kernel="dequant_mm")
    try:
        y = triton_kernels.matmul(x2, w, bias, gated, cfg)
    except OutOfResources as exc:  # a device with less shared memory than `fit` assumed: raised before launching
        _FALLBACK.add(key)
        logger.warning("NF4 %s does not fit this GPU (%s): dequantizing into cuBLAS instead", cfg, exc)
        y = triton_kernels.matmul(x2, w, bias, gated, KernelConfig(kernel="dequant_mm"))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias: x [..., K] (bf16/fp16/fp32) -> [..., N] in x.dtype; bias [N] or None."""
    if not _triton_ok(x, w):
        return reference.linear(x, w, bias)
    return _matmul(x, w, bias, gated=False)


def linear_gate_up_silu(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = silu(x Wg^T + bg) * (x Wu^T + bu): x [..., K] -> [..., I]; w has two [I, K] segments (gate, up).

    Gate and up are rounded to x.dtype, then silu, then the product, like the unfused MLP.
    """
    if not _triton_ok(x, w):
        return reference.linear_gate_up_silu(x, w, bias)
    return _matmul(x, w, bias, gated=True)


def dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W: [N, K] in dtype (default w.dtype), bit-identical to bitsandbytes' dequantize_4bit of each segment."""
    dtype = dtype or w.dtype
    if w.packed.is_cuda and w.kernel_ok and dtype in _KERNEL_DTYPES:
        from . import triton_kernels

        return triton_kernels.dequantize(w, dtype)
    return reference.dequantize(w, dtype)
