"""Per-step LoRA metadata: which slots a step uses and each token's weight on them.

Built once per step from per-sequence (slot, weight) pairs, in O(sequences) Python,
then shared by every adapted projection of every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LoraBatchMeta:
    active: slice | torch.Tensor
    """Distinct slots used this step: a slice when contiguous, else an int64 tensor [U]."""
    num_active: int
    token_weights: torch.Tensor
    """[T, U] in the compute dtype: token t's weight on active slot u (0 = not used)."""
    target_modules: frozenset[str]
    """Projections that at least one active adapter adapts; the others skip LoRA this step."""
    slot_ids: torch.Tensor
    """[T, K] int64, -1 padded: the per-token (slot, weight) pairs, for the gather oracle / kernels."""
    pair_weights: torch.Tensor
    """[T, K] float32, the weights of slot_ids."""


def build_lora_meta(seq_pairs: list[tuple[tuple[int, float], ...]], tokens_per_seq: list[int],
                    slot_targets: dict[int, frozenset[str]], device: torch.device,
                    dtype: torch.dtype) -> LoraBatchMeta | None:
    """seq_pairs[i]: the (slot, weight) pairs of sequence i (empty = base model);
    tokens_per_seq[i]: how many of this step's tokens belong to it, in token order.
    Returns None when no sequence of the step uses an adapter."""
    active_list = sorted({slot for pairs in seq_pairs for slot, _ in pairs})
    if not active_list:
        return None
    column = {slot: u for u, slot in enumerate(active_list)}
    num_active = len(active_list)
    max_pairs = max(len(pairs) for pairs in seq_pairs)
    seq_weights = [[0.0] * num_active for _ in seq_pairs]
    seq_slots = [[-1] * max_pairs for _ in seq_pairs]
    seq_pair_weights = [[0.0] * max_pairs for _ in seq_pairs]
    for i, pairs in enumerate(seq_pairs):
        for k, (slot, weight) in enumerate(pairs):
            seq_weights[i][column[slot]] += weight
            seq_slots[i][k] = slot
            seq_pair_weights[i][k] = weight
    counts = torch.tensor(tokens_per_seq, dtype=torch.int64)
    token_weights = torch.tensor(seq_weights, dtype=torch.float32).repeat_interleave(counts, dim=0)
    slot_ids = torch.tensor(seq_slots, dtype=torch.int64).repeat_interleave(counts, dim=0)
    pair_weights = torch.tensor(seq_pair_weights, dtype=torch.float32).repeat_interleave(counts, dim=0)
    contiguous = active_list[-1] - active_list[0] + 1 == num_active
    non_blocking = device.type == "cuda"
    if contiguous:
        active: slice | torch.Tensor = slice(active_list[0], active_list[-1] + 1)
    else:
        active = torch.tensor(active_list, dtype=torch.int64).to(device, non_blocking=non_blocking)
    targets = frozenset().union(*(slot_targets[slot] for slot in active_list))
    return LoraBatchMeta(
        active=active,
        num_active=num_active,
        token_weights=_to(token_weights, device, dtype, non_blocking),
        target_modules=targets,
        slot_ids=_to(slot_ids, device, torch.int64, non_blocking),
        pair_weights=_to(pair_weights, device, torch.float32, non_blocking),
    )


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype, non_blocking: bool) -> torch.Tensor:
    if non_blocking:
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=non_blocking)
