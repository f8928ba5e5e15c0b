"""The grouped LoRA op in plain PyTorch: the CPU backend and the oracle of the Triton kernels.

Same signature and semantics as `triton_shrink` + `triton_expand` (see `add_lora`), vectorized over
the step: the active slots' A and B^T rows are gathered once per slice (only rows < rank; rows
beyond a slot's rank are masked before use, so garbage there never leaks), then two dense matmuls
cover every token, like `reference.add_lora_active` but honouring each (slice, slot) rank and
row_start. Rounding mirrors the kernels: fp32 (fp64 for fp64 pools) accumulation, the weighted
shrink output rounded to the compute dtype before the expand (half precision), one final rounding
of out + delta.
"""
from __future__ import annotations

import torch

from .stacks import LoraGroupStacks
from .step_meta import LoraStepMeta

HALF = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positions(meta: LoraStepMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """(token row, block) of every sorted position 0..num_active_tokens-1."""
    nb = meta.num_blocks
    blocks = torch.arange(nb, device=meta.token_order.device).repeat_interleave(
        meta.block_count[:nb].long(), output_size=meta.num_active_tokens)
    return meta.token_order[:meta.num_active_tokens].long(), blocks


def _active(group: LoraGroupStacks, meta: LoraStepMeta) -> list[int]:
    """The step's slots that this group's pools hold weights for (sorted)."""
    return sorted(s for s in meta.active_slots if s in group.adapted_slots)


def _gather_rows(group: LoraGroupStacks, j: int, slots: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool rows [U, R], valid [U, R]) of slice j for `slots`, R = the largest of their ranks."""
    slots_t = torch.tensor(slots, dtype=torch.long, device=device)
    ranks = group.rank[j].long()[slots_t]
    width = max(1, int(group.host_rank[j, slots].max()))
    r = torch.arange(width, device=device)
    valid = r[None, :] < ranks[:, None]
    rows = (group.row_start.long()[slots_t][:, None] + r[None, :]).clamp(max=group.a_pool.shape[1] - 1)
    return rows, valid


def _slot_columns(slots: list[int], num_slots: int, device) -> torch.Tensor:
    """[S + 1]: column u of each active slot; other slots and index -1 (pair padding) -> spare column U."""
    column = torch.full((num_slots + 1,), len(slots), dtype=torch.long, device=device)
    column[torch.tensor(slots, dtype=torch.long, device=device)] = torch.arange(len(slots), device=device)
    return column


def _pair_weights(meta: LoraStepMeta, slots: list[int], num_slots: int, dtype, device) -> torch.Tensor:
    """[num_blocks, U]: block b's total weight on active slot u (pairs naming one slot twice add up)."""
    nb = meta.num_blocks
    column = _slot_columns(slots, num_slots, device)
    weights = torch.zeros(nb, len(slots) + 1, dtype=dtype, device=device)
    weights.scatter_add_(1, column[meta.block_slots[:nb].long()], meta.block_weights[:nb].to(dtype))
    return weights[:, :len(slots)]  # the spare column collects padding and is dropped


def shrink(x: torch.Tensor, group: LoraGroupStacks, meta: LoraStepMeta) -> torch.Tensor:
    """y[j, pos, p, r] = x[token_order[pos]] @ a_pool[j, row_start[s] + r]   (s = slot of pair p of pos's group)

    for r < rank[j, s], 0 elsewhere (and for p >= that group's pairs). Unweighted, unsummed over splits:
    the sum of the Triton shrink's split partials. x: [T, K_in] -> y: [J, num_active_tokens, max_pairs,
    max_rank] fp32 (fp64 for fp64 pools). Nothing is mutated.
    """
    acc = _acc_dtype(x.dtype)
    tokens, pos_block = _positions(meta)
    j_count, n_pos = group.num_slices, tokens.numel()
    y = torch.zeros(j_count, n_pos, meta.max_pairs, group.max_rank, dtype=acc, device=x.device)
    slots = _active(group, meta)
    if not slots or n_pos == 0:
        return y
    xs = x[tokens].to(acc)
    column = _slot_columns(slots, group.num_slots, x.device)
    pair_columns = column[meta.block_slots[:meta.num_blocks, :meta.max_pairs].long()][pos_block]  # [n_pos, P]
    for j in range(j_count):
        rows, valid = _gather_rows(group, j, slots, x.device)
        a = torch.where(valid[..., None], group.a_pool[j][rows], 0).to(acc)  # [U, R, K]
        full = (xs @ a.reshape(-1, a.shape[-1]).t()).view(n_pos, len(slots), -1)  # [n_pos, U, R]
        full = torch.cat([full, full.new_zeros(n_pos, 1, full.shape[-1])], dim=1)  # spare column: pad pairs
        y[j, :, :, :full.shape[-1]] = full[torch.arange(n_pos, device=x.device)[:, None], pair_columns]
    return y


def add_lora(out: torch.Tensor, x: torch.Tensor, group: LoraGroupStacks, meta: LoraStepMeta) -> torch.Tensor:
    """out[t, n0_j + n] +=
           sum_p w_p * sum_{r < rank[j, s_p]} (x[t] @ A_{s_p,j}[r]) * bt_pool[row_start[s_p] + r, n0_j + n]

    for every token t of a mix group (its (s_p, w_p) pairs from meta), every slice j, n < N_j; rows of
    base tokens are not written. x: [T, K_in] (pool dtype); out: [T, N_total], mutated and returned.
    """
    slots = _active(group, meta)
    if not slots or meta.num_active_tokens == 0:
        return out
    acc = _acc_dtype(x.dtype)
    tokens, pos_block = _positions(meta)
    xs = x[tokens].to(acc)
    weights = _pair_weights(meta, slots, group.num_slots, acc, x.device)[pos_block]  # [n_pos, U]
    for j, (n0, n) in enumerate(zip(group.slice_offsets, group.out_features)):
        rows, valid = _gather_rows(group, j, slots, x.device)
        a = torch.where(valid[..., None], group.a_pool[j][rows], 0).to(acc)  # [U, R, K]
        bt = torch.where(valid[..., None], group.bt_pool[rows, n0:n0 + n], 0).to(acc)  # [U, R, N]
        y = (xs @ a.reshape(-1, a.shape[-1]).t()).view(xs.shape[0], len(slots), -1)  # [n_pos, U, R]
        y = y * weights[:, :, None]
        if x.dtype in HALF:
            y = y.to(x.dtype).to(acc)
        delta = y.reshape(xs.shape[0], -1) @ bt.reshape(-1, n)
        cols = out[tokens, n0:n0 + n]
        out[tokens, n0:n0 + n] = (cols.to(acc) + delta).to(out.dtype)
    return out
