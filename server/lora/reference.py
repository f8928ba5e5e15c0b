"""LoRA ops in plain PyTorch: the oracle for every fast kernel, and the CPU backend.

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


def add_lora_active(out: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                    lora_b_stacked: torch.Tensor, active: slice | torch.Tensor,
                    token_weights: torch.Tensor) -> torch.Tensor:
    """out[t] += sum_u token_weights[t, u] * lora_b_stacked[active[u]] @ lora_a_stacked[active[u]] @ x[t]

    x: [T, in]; active: the distinct slots of this step, a slice (contiguous slots: no copies) or an
    int64 tensor [U]; token_weights: [T, U], a token's weight on each active slot (1 for its adapter,
    w_i for a mix, 0 elsewhere). out: [T, out], mutated and returned.

    The step's adapters are rank-concatenated into one [U*R, in] and one [out, U*R] matrix, so the
    whole batch is two dense matmuls whatever its mix of adapters: no per-adapter Python loop, no
    per-token weight gather. Work grows with U; the Triton SGMV kernels remove that factor.
    lora_b_stacked is read through its [out, S, R] permutation, which is contiguous in the slot
    buffers (`slots.LoraSlots`), so a contiguous range of slots is a view.
    """
    num_tokens, num_active = token_weights.shape
    _, rank, n_in = lora_a_stacked.shape
    b_by_out = lora_b_stacked.permute(1, 0, 2)  # [out, S, R]
    if isinstance(active, slice):
        a = lora_a_stacked[active].reshape(num_active * rank, n_in)
        b = b_by_out[:, active].reshape(-1, num_active * rank)
    else:
        a = lora_a_stacked.index_select(0, active).reshape(num_active * rank, n_in)
        b = b_by_out.index_select(1, active).reshape(-1, num_active * rank)
    y = x @ a.t()
    if num_active > 1:
        y = (y.view(num_tokens, num_active, rank) * token_weights.to(x.dtype)[:, :, None]).view(
            num_tokens, num_active * rank)
    else:
        y = y * token_weights.to(x.dtype)
    return out.addmm_(y, b.t())
