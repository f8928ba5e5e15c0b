"""LoRA ops in plain PyTorch, per token: the oracle the grouped twin (`grouped_reference`) and the kernels are
checked against.

Slots: each adapted projection holds two stacks shared by all adapters,
    lora_a_stacked: [S, R, in]    lora_b_stacked: [S, out, R]
where S is the number of adapter slots and R the slot rank (max_lora_rank).
An adapter of rank r < R occupies rows [:r] of A and columns [:r] of B; the
padding is zero, which leaves x @ A.T @ B.T unchanged. B already carries the
adapter's scale (alpha / r, or alpha / sqrt(r) with rsLoRA).

A token may use several adapters at once, each with a weight (an exact LINEAR
mix); slot -1 means "no adapter" for that pair.
"""
from __future__ import annotations

import torch


def shrink(x: torch.Tensor, lora_a_stacked: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """y[t, k, :] = lora_a_stacked[slot_ids[t, k]] @ x[t]   (0 where slot_ids[t, k] == -1)

    x: [T, in]; lora_a_stacked: [S, R, in]; slot_ids: [T, K] int64 -> y: [T, K, R] in fp32.
    Gathers one A per (token, pair): simple and exact, O(T*K*R*in) memory; the oracle.
    """
    valid = slot_ids >= 0
    a = lora_a_stacked[slot_ids.clamp(min=0)].float()  # [T, K, R, in]
    y = torch.einsum("tkri,ti->tkr", a, x.float())
    return y * valid[..., None]


def expand(y: torch.Tensor, lora_b_stacked: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """out[t, :] += sum_k weights[t, k] * lora_b_stacked[slot_ids[t, k]] @ y[t, k]   (skipping slot -1)

    y: [T, K, R] fp32; lora_b_stacked: [S, out, R]; weights: [T, K]; out: [T, out], mutated and returned.
    """
    valid = (slot_ids >= 0).float() * weights.float()
    b = lora_b_stacked[slot_ids.clamp(min=0)].float()  # [T, K, out, R]
    delta = torch.einsum("tkor,tkr,tk->to", b, y, valid)
    out += delta.to(out.dtype)
    return out


def add_lora_gather(out: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                    lora_b_stacked: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out += sum_k w[t,k] * B[s] @ A[s] @ x[t] with s = slot_ids[t,k]: shrink then expand, per token."""
    return expand(shrink(x, lora_a_stacked, slot_ids), lora_b_stacked, slot_ids, weights, out)
