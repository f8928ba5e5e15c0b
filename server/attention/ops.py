"""The paged-attention seam the model calls: Triton kernels for CUDA tensors, the PyTorch twin otherwise.

Semantics, shapes and dtypes: `reference.paged_attention` and `reference.write_kv`. On CUDA both ops
are asynchronous and capturable in CUDA graphs (no host sync, grid from shapes only).
"""
from __future__ import annotations

import importlib

import torch

from . import reference
from .meta import AttentionStepMeta

TRITON_WRITE_KV = True
"""One Triton launch for K and V; False: two index_copy_ (kept while the device benchmark decides)."""


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionStepMeta,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; caches [num_blocks, block_size, Hkv, D] -> [T, Hq, D] (see `reference`)."""
    if q.is_cuda:
        return _triton().paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    return reference.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kv_index: torch.Tensor) -> None:
    """Caches mutated: the flat KV position kv_index[t] gets k[t], v[t] ([T, Hkv, D])."""
    if k.is_cuda and TRITON_WRITE_KV:
        _triton().write_kv(k_cache, v_cache, k, v, kv_index)
    else:
        reference.write_kv(k_cache, v_cache, k, v, kv_index)


def _triton():
    """The Triton module, imported on first CUDA use: triton is the optional `gpu` extra, and a CPU
    process that never imports it stays free to run Triton's interpreter (TRITON_INTERPRET is read when
    triton and the kernels are first imported)."""
    try:
        return importlib.import_module(".triton_paged", __package__)
    except ImportError as error:
        raise RuntimeError("paged attention on CUDA needs triton (pip install 'loraplex[gpu]')") from error
