"""LoRA shrink (x @ A^T) for every slice of a projection group in one launch, tokens grouped by mix group.

Two users: the split-K shrink kernel of the two-kernel path (large K, prefill), and `shrink_rows`,
the inner loop the fused kernel of `triton_expand` runs over all of K.

The shrink kernel runs a fixed grid of `split_programs` persistent programs. From the step's block
count (read on the device) every program derives the same plan: K is cut into `splits` ranges
(`split_plan`), and work items (block, split, slice) are dealt round-robin. An item reads each pair's
A rows once for up to block_m tokens; each slot loops over its own rank in block_r chunks (no padding
to the maximum rank). Partials go to separate planes of the work space; `triton_expand` sums them in
split order, so the result is deterministic (no atomics) and independent of the grid size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .kernel_config import LoraKernelConfig, num_token_blocks, supports_pdl
from .stacks import LoraGroupStacks
from .step_meta import LoraStepMeta


@triton.jit
def shrink_rows(x_rows, m_mask, a_rows, r_mask, k_lo, k_hi,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_R] fp32: sum over k in [k_lo, k_hi) of x_rows[m][k] * a_rows[r][k] (row pointers);
    masked rows of x / A count as 0. EVEN_K: k_lo and k_hi are multiples of BLOCK_K (no K mask)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = tl.multiple_of(k0, BLOCK_K) + offs_k
        if EVEN_K:
            xt = tl.load(x_rows[:, None] + ks[None, :], mask=m_mask[:, None], other=0.0)
            at = tl.load(a_rows[:, None] + ks[None, :], mask=r_mask[:, None], other=0.0)
        else:
            k_mask = ks < k_hi
            xt = tl.load(x_rows[:, None] + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_rows[:, None] + ks[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(at), acc, input_precision=PRECISION)
    return acc


@triton.jit
def cdiv(a, b):
    """tl.cdiv for positive ints (a jit helper of this module, which Triton's interpreter can run)."""
    return (a + b - 1) // b


@triton.jit
def split_plan(num_blocks, num_slices, K, split_programs, max_split, BLOCK_K: tl.constexpr):
    """(splits, k_per_split) of a step with num_blocks used blocks: about split_programs items in all,
    split ranges a multiple of BLOCK_K wide, at most max_split of them. The shrink and the expand both
    derive it from the same inputs, so they agree without passing it."""
    want = split_programs // tl.maximum(num_blocks * num_slices, 1)
    splits = tl.minimum(tl.maximum(want, 1), max_split)
    k_per_split = cdiv(cdiv(K, splits), BLOCK_K) * BLOCK_K
    return cdiv(K, k_per_split), k_per_split


@triton.jit
def _shrink_kernel(
        x_ptr, a_ptr, ws_ptr, rank_ptr, row_start_ptr, header_ptr, records_ptr, token_order_ptr,
        record_stride, num_slots, num_slices, K, split_programs, max_split,
        x_stride_t, a_stride_j, a_stride_row, ws_stride_split, ws_stride_j, ws_stride_pos, ws_stride_pair,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr,
        PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    nb = tl.load(header_ptr)
    splits, k_per_split = split_plan(nb, num_slices, K, split_programs, max_split, BLOCK_K)
    per_block = splits * num_slices
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    for item in range(pid, nb * per_block, num_programs):
        b = item // per_block
        rest = item - b * per_block
        s = rest // num_slices
        j = rest - s * num_slices
        rec = records_ptr + b * record_stride
        start = tl.load(rec + 1)
        count = tl.load(rec + 2)
        num_pairs = tl.load(rec + 3)
        m_mask = offs_m < count
        tok = tl.load(token_order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
        if USE_PDL:
            gdc_wait()  # x comes from the kernels before this one
        x_rows = x_ptr + tok * x_stride_t
        k_lo = s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        ws_rows = (ws_ptr + s.to(tl.int64) * ws_stride_split + j * ws_stride_j
                   + (start + offs_m).to(tl.int64) * ws_stride_pos)
        for p in range(num_pairs):
            slot = tl.load(rec + 4 + p)
            rank = tl.load(rank_ptr + j * num_slots + slot)
            row0 = tl.load(row_start_ptr + slot)
            for r0 in range(0, rank, BLOCK_R):
                rows = r0 + offs_r
                r_mask = rows < rank
                a_rows = a_ptr + j.to(tl.int64) * a_stride_j + (row0 + rows).to(tl.int64) * a_stride_row
                acc = shrink_rows(x_rows, m_mask, a_rows, r_mask, k_lo, k_hi,
                                  BLOCK_M, BLOCK_R, BLOCK_K, EVEN_K, PRECISION)
                # All BLOCK_R columns: those at or past the rank are exact zeros (A rows masked), so the
                # expand sums planes without a rank mask.
                tl.store(ws_rows[:, None] + p * ws_stride_pair + rows[None, :], acc, mask=m_mask[:, None])
    if USE_PDL:
        gdc_wait()  # every program waits before it exits, items or not


def pdl_options(config: LoraKernelConfig, tensor: torch.Tensor) -> dict:
    """Programmatic dependent launch (sm_90+, CUDA only, config.pdl): the kernel may start while the kernel
    before it drains; it reads nothing that kernel may still write before `gdc_wait`, writes nothing before
    it either, and every program waits before it exits, so completion order is what it was. Nobody
    triggers early (no gdc_launch_dependents), so a dependent starts only once all programs of its
    predecessor have exited: no program ever waits on one that cannot be scheduled."""
    on = config.pdl and supports_pdl(tensor.device)
    return dict(USE_PDL=on, launch_pdl=on) if on else dict(USE_PDL=False)


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for half-precision operands


def workspace(x: torch.Tensor, group: LoraGroupStacks, meta: LoraStepMeta, config: LoraKernelConfig,
              rank_bound: int) -> torch.Tensor:
    """Uninitialised fp32 [max_split, J, T, pairs, rank chunks * block_r]; entries the op does not need are
    never read."""
    chunks = -(-rank_bound // config.block_r)
    return torch.empty(config.max_split, group.num_slices, x.shape[0], meta.launch_pairs, chunks * config.block_r,
                       dtype=torch.float32, device=x.device)


def lora_shrink(x: torch.Tensor, group: LoraGroupStacks, meta: LoraStepMeta, config: LoraKernelConfig,
                rank_bound: int, ws: torch.Tensor | None = None) -> torch.Tensor:
    """ws[k, j, pos, p, r] = sum_{c in split k} x[token_order[pos], c] * a_pool[j, row_start[s] + r, c]

    for every used block's positions pos, pair p < its num_pairs with slot s, slice j, r < cdiv(rank[j, s],
    block_r) * block_r (0 at or past the rank); split k covers K_in columns [k * kps, (k + 1) * kps) of
    the device-side plan (`split_plan`; splits <= config.max_split). Other entries are left as they were.
    x: [T, K_in] in the pools' dtype, last dim contiguous; rank_bound: >= every rank the step reads.
    ws: fp32 [max_split, J, >= T, >= pairs, >= chunks * block_r] (allocated by `workspace` when None),
    written and returned. Weights are applied by the expand.
    """
    assert x.dtype == group.a_pool.dtype and x.stride(1) == 1 and group.a_pool.stride(2) == 1
    if ws is None:
        ws = workspace(x, group, meta, config, rank_bound)
    assert ws.shape[0] >= config.max_split and ws.shape[4] >= -(-rank_bound // config.block_r) * config.block_r
    blocks = num_token_blocks(meta, x.shape[0])
    if blocks == 0:
        return ws
    k_in = x.shape[1]
    grid = (max(1, min(config.split_programs, blocks * config.max_split * group.num_slices)),)
    _shrink_kernel[grid](
        x, group.a_pool, ws, group.rank, group.row_start, meta.header, meta.block_records, meta.token_order,
        meta.record_stride, group.num_slots, group.num_slices, k_in, config.split_programs, config.max_split,
        x.stride(0), group.a_pool.stride(0), group.a_pool.stride(1), ws.stride(0), ws.stride(1), ws.stride(2),
        ws.stride(3),
        BLOCK_M=meta.block_m, BLOCK_K=config.block_k, BLOCK_R=config.block_r, EVEN_K=k_in % config.block_k == 0,
        PRECISION=precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl_options(config, x))
    return ws
