"""Dispatch of the LoRA op to a backend: `active` (rank-concatenated, default) or `gather` (oracle)."""
from __future__ import annotations

import torch

from . import reference
from .meta import LoraBatchMeta

BACKENDS = ("active", "gather")


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor, lora_b_stacked: torch.Tensor,
             meta: LoraBatchMeta, backend: str = "active") -> torch.Tensor:
    """out[t] += sum over token t's (slot s, weight w) pairs of w * lora_b_stacked[s] @ lora_a_stacked[s] @ x[t].

    x: [T, in]; lora_a_stacked: [S, R, in]; lora_b_stacked: [S, out, R] (scale folded in);
    out: [T, out], mutated and returned. See `reference` for the semantics of each backend.
    """
    if backend == "active":
        return reference.add_lora_active(out, x, lora_a_stacked, lora_b_stacked, meta.active, meta.token_weights)
    if backend == "gather":
        return reference.add_lora_gather(out, x, lora_a_stacked, lora_b_stacked, meta.slot_ids, meta.pair_weights)
    raise ValueError(f"unknown LoRA backend {backend!r} (choose from {', '.join(BACKENDS)})")
