"""Attention over packed rows without a [batch, 1, seq, seq] mask: each example attends only to itself.

With sdpa, transformers turns position restarts into a dense block-diagonal mask, which also rules out
SDPA's flash backend (no masks) and computes every cross-example block only to mask it out. Here the
collator computes the example boundaries once per batch, over the flattened [batch * seq] tokens:

    cu_seq_lens = [0, end of example 0, end of example 1, ..., batch * seq]   (int32, padding is a segment)
    out[t] = softmax(q[t] . k[s] * scale) . v[s]  over s in t's segment, s <= t

and the registered attention `loraplex_varlen` runs it as one FlashAttention varlen call on a GPU
(`torch.nn.attention.varlen.varlen_attn`, PyTorch >= 2.10), or segment by segment with SDPA elsewhere
(`segment_attention`: the reference, and the CPU path). No device sync per layer: max_length comes
from the collator as a Python int. transformers builds no mask for an attention name it has no mask
function for, so none is materialized.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .config import ATTENTIONS

VARLEN = "loraplex_varlen"


def varlen_kernel_available() -> bool:
    """FlashAttention varlen inside PyTorch, usable on this machine's GPU."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def resolve_attention(setting: str, cuda: bool, packing: bool) -> str:
    """'sdpa' or 'varlen'. auto: varlen for packed rows on a GPU that has the kernel (CPU keeps sdpa: the
    segment loop is a reference, not faster)."""
    assert setting in ATTENTIONS, setting
    if setting == "auto":
        return "varlen" if packing and cuda and varlen_kernel_available() else "sdpa"
    return setting


def boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Segments of the flattened [B * T] tokens: a new one where a position restarts at 0 and at each row.
    position_ids: [B, T] (CPU) -> (cu_seq_lens [segments + 1] int32, longest segment)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    width = position_ids.shape[-1]
    row_starts = torch.arange(0, flat.numel(), width)
    starts = torch.unique(torch.cat([starts, row_starts]))  # sorted; a row always opens a segment
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """The reference: causal SDPA per segment. query: [N, Hq, D], key/value: [N, Hkv, D] -> [N, Hq, D]."""
    out = torch.empty_like(query)
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        q = query[start:end].transpose(0, 1)                                   # [Hq, n, D]
        k = key[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)   # [Hq, n, D]
        v = value[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _flash_varlen(query, key, value, cu_seq_lens, max_length: int, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    groups = query.shape[1] // key.shape[1]
    if groups > 1 and "enable_gqa" in _varlen_params():
        return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scale,
                           window_size=(-1, 0), enable_gqa=True)
    if groups > 1:  # PyTorch 2.10/2.11: no GQA in varlen_attn
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scale,
                       window_size=(-1, 0))


_PARAMS: tuple[str, ...] | None = None


def _varlen_params() -> tuple[str, ...]:
    global _PARAMS
    if _PARAMS is None:
        from torch.nn.attention.varlen import varlen_attn

        _PARAMS = tuple(inspect.signature(varlen_attn).parameters)
    return _PARAMS


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                             max_length_q: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface. query: [B, Hq, T, D], key/value: [B, Hkv, T, D] -> ([B, T, Hq, D], None).
    Without cu_seq_lens: with a 2D padding mask each row is one segment and its right padding another; with none,
    every row is one example (the collator leaves cu_seq_lens out then) and SDPA's causal kernels run it, GQA
    without copying K/V (varlen_attn in PyTorch 2.11 has no GQA)."""
    batch, heads, width, head_dim = query.shape
    assert dropout == 0.0, "attention dropout is not supported (Llama-family models train without it)"
    scale = scaling if scaling is not None else head_dim ** -0.5
    if cu_seq_lens_q is None and attention_mask is None:  # whole rows, one example each: plain causal SDPA
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=key.shape[1] != heads)
        return out.transpose(1, 2).contiguous(), None
    if cu_seq_lens_q is None:
        cu_seq_lens_q, max_length_q = _row_segments(attention_mask, batch, width)
    q = query.transpose(1, 2).reshape(batch * width, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * width, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * width, value.shape[1], head_dim)
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu_seq_lens_q.to(q.device, torch.int32), int(max_length_q), scale)
    else:
        out = segment_attention(q, k, v, cu_seq_lens_q, scale)
    return out.reshape(batch, width, heads, head_dim), None


def _row_segments(attention_mask: torch.Tensor, batch: int, width: int) -> tuple[torch.Tensor, int]:
    """Whole rows, each split into its tokens and its right padding (from a 2D mask: one sync, eval only)."""
    assert attention_mask.dim() == 2, "loraplex_varlen takes a 2D padding mask (or none), never a 4D one"
    lengths = attention_mask.sum(-1).tolist()
    assert all(attention_mask[b, :n].all() for b, n in enumerate(lengths)), "right padding only"
    sizes = [s for n in lengths for s in (n, width - n) if s > 0]
    cu = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu, width


def register() -> str:
    """Make `loraplex_varlen` an attention implementation transformers models accept (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN


def use_varlen(model) -> None:
    """Switch a loaded model (PEFT-wrapped or not) to loraplex_varlen."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(VARLEN)
