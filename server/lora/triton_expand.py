"""LoRA expand (y @ B^T, added into the fused base output) for every slice of a group in one launch, and
the fused single-kernel LoRA op (x @ A^T computed in the same program) for decode-sized steps.

Work items are (token block, slice, chunk of consecutive column tiles of that slice); a chunk never
straddles two slices. The grid is a fixed number of persistent programs (`config.programs`); from the
step's block and token counts, read on the device, every program derives the same plan: the chunk
width comes from a small cost model (see the kernel), and items are dealt round-robin. So one captured
graph serves one shared adapter (few blocks: few wide-enough chunks, each recomputing its block's
x @ A^T from L2-resident A) and 32 distinct adapters (many blocks: about one item per program, each
adapter's A read from HBM once and from L2 a few times, its B once) alike.

Per item, phase A makes each pair's weighted, rounded y = rnd(w_p * x @ A_p^T) for the block's tokens,
either from x and A over all of K (fused) or by summing the shrink's split partials in split order
(two-kernel path). Phase B walks the chunk's tiles: acc = out[tile] in fp32, then acc += y_p @ B_p^T[:, tile]
for each pair and rank chunk in order (one dot chain, k in rank order), one rounding back into `out`.
That chain is the same whichever path, block_r or plan runs it (rows past a rank are exact zeros), so
graph replays (pool-sized rank tiles, pair capacity) and eager steps give the same bits. The common
case (one pair, rank <= block_r) keeps y in registers; otherwise y goes to a per-program scratch
(written and read back by the same program, with barriers). Deterministic: no atomics, every output
element is summed in a fixed order that does not depend on the plan or the grid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .kernel_config import LoraKernelConfig, num_token_blocks
from .stacks import LoraGroupStacks
from .step_meta import LoraStepMeta
from .triton_shrink import cdiv, pdl_options, precision, shrink_rows, split_plan

MAX_SLICES = 4


@triton.jit
def _pick(j, v0, v1, v2, v3):
    return tl.where(j == 0, v0, tl.where(j == 1, v1, tl.where(j == 2, v2, v3)))


@triton.jit
def _block_y(x_ptr, a_ptr, ws_ptr, x_rows, m_mask, ws_rows, j, p, row0, rows, r_mask, weight, K, splits,
             a_stride_j, a_stride_row, ws_stride_split, ws_stride_pair, out_dtype: tl.constexpr,
             FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
             SPLIT_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """rnd(weight * y) [BLOCK_M, BLOCK_R] for pair p's rank rows `rows` (rounded to the pools' dtype, as PEFT
    rounds between lora_A and lora_B): from x and A over all of K (FUSED), else the shrink's partials,
    SPLIT_BLOCK planes per round (unrolled, all in flight at once), summed in split order."""
    if FUSED:
        a_rows = a_ptr + j.to(tl.int64) * a_stride_j + (row0 + rows).to(tl.int64) * a_stride_row
        y = shrink_rows(x_rows, m_mask, a_rows, r_mask, 0, K, BLOCK_M, BLOCK_R, BLOCK_K, EVEN_K, PRECISION)
    else:
        y = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
        tile = ws_rows[:, None] + p * ws_stride_pair + rows[None, :]
        for s0 in range(0, splits, SPLIT_BLOCK):
            for ds in tl.static_range(SPLIT_BLOCK):  # unrolled: the loads of a round are all in flight
                s = s0 + ds
                y += tl.load(tile + s * ws_stride_split, mask=m_mask[:, None] & (s < splits), other=0.0)
    return (y * weight).to(out_dtype)


@triton.jit
def _chunks(c, t0, t1, t2, t3):
    return cdiv(t0, c) + cdiv(t1, c) + cdiv(t2, c) + cdiv(t3, c)


@triton.jit
def _expand_kernel(
        x_ptr, a_ptr, ws_ptr, bt_ptr, out_ptr, scratch_ptr, rank_ptr, row_start_ptr,
        header_ptr, records_ptr, weights_ptr, token_order_ptr,
        record_stride, weights_col, num_slots, num_slices, K, l2_streams, split_programs, max_split,
        rank_chunks, plan_steps,
        x_stride_t, a_stride_j, a_stride_row, ws_stride_split, ws_stride_j, ws_stride_pos, ws_stride_pair,
        bt_stride_row, out_stride_t, scratch_stride_prog,
        n_off0, n_off1, n_off2, n_off3, n_len0, n_len1, n_len2, n_len3,
        FUSED: tl.constexpr, FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
        EVEN_K: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    nb = tl.load(header_ptr)
    lora_dtype: tl.constexpr = bt_ptr.dtype.element_ty

    splits = 1
    if not FUSED:
        splits, _unused = split_plan(nb, num_slices, K, split_programs, max_split, BLOCK_K)

    # The plan (identical in every program): each slice's column tiles in chunks of about c tiles, c picked
    # from 1, 2, 4, ..., max_t by a cost model. An item costs `head` bytes before its tiles (fused: its
    # block's x rows and one slice's A, over all of K; else: the split partials) plus `per_tile` bytes a
    # tile (B^T rows, out read and written). The step takes about the larger of (a) the busiest program's
    # items and (b) all heads together over the L2 bandwidth, which one program's share of it times
    # `l2_streams` approximates: one shared adapter (few blocks, large heads) gets few wide chunks, many
    # adapters (many blocks) get as many items as there are programs.
    rows_est = tl.minimum(cdiv(tl.load(header_ptr + 1), tl.maximum(nb, 1)), BLOCK_M).to(tl.float32)
    esize: tl.constexpr = lora_dtype.primitive_bitwidth // 8
    if FUSED:
        head = (BLOCK_R + rows_est) * K * esize
    else:
        head = splits * rows_est * BLOCK_R * 4.0 + 4096.0
    per_tile = BLOCK_N * (BLOCK_R + 2.0 * rows_est) * esize
    t0 = cdiv(n_len0, BLOCK_N)
    t1 = cdiv(n_len1, BLOCK_N)
    t2 = cdiv(n_len2, BLOCK_N)
    t3 = cdiv(n_len3, BLOCK_N)
    max_t = tl.maximum(tl.maximum(t0, t1), tl.maximum(t2, tl.maximum(t3, 1)))
    cand = max_t * 0 + 1
    c = max_t
    best = head * 0.0 + 3.0e38
    for _step in range(plan_steps):
        cand = tl.minimum(cand, max_t)
        items = nb * _chunks(cand, t0, t1, t2, t3)
        cost = tl.maximum(items * head / l2_streams, cdiv(items, num_programs) * (head + cand * per_tile))
        better = cost < best
        c = tl.where(better, cand, c)
        best = tl.where(better, cost, best)
        cand = cand * 2
    n0 = cdiv(t0, c)
    n1 = cdiv(t1, c)
    n2 = cdiv(t2, c)
    n3 = cdiv(t3, c)
    e0 = n0
    e1 = e0 + n1
    e2 = e1 + n2
    per_block = e2 + n3

    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_tile = tl.arange(0, BLOCK_N)
    chunk_elems: tl.constexpr = BLOCK_M * BLOCK_R
    scratch_tile = (scratch_ptr + pid.to(tl.int64) * scratch_stride_prog
                    + offs_m[:, None] * BLOCK_R + offs_r[None, :])
    for item in range(pid, nb * per_block, num_programs):
        b = item // per_block
        rest = item - b * per_block
        j = (rest >= e0).to(tl.int32) + (rest >= e1).to(tl.int32) + (rest >= e2).to(tl.int32)
        q = rest - _pick(j, 0, e0, e1, e2)
        cs = cdiv(_pick(j, t0, t1, t2, t3), tl.maximum(_pick(j, n0, n1, n2, n3), 1))  # balanced chunks
        n_off = _pick(j, n_off0, n_off1, n_off2, n_off3)
        n_len = _pick(j, n_len0, n_len1, n_len2, n_len3)
        tile_lo = q * cs
        tile_hi = tl.minimum(tile_lo + cs, cdiv(n_len, BLOCK_N))

        rec = records_ptr + b * record_stride
        start = tl.load(rec + 1)
        count = tl.load(rec + 2)
        m_mask = offs_m < count
        tok = tl.load(token_order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
        x_rows = x_ptr + tok * x_stride_t
        ws_rows = ws_ptr + j * ws_stride_j + (start + offs_m).to(tl.int64) * ws_stride_pos
        o_rows = out_ptr + tok * out_stride_t
        if FAST:  # one pair, one rank chunk: y stays in registers
            slot = tl.load(rec + 4)
            weight = tl.load(weights_ptr + b * record_stride + weights_col)
            rank = tl.load(rank_ptr + j * num_slots + slot)
            row0 = tl.load(row_start_ptr + slot)
            if USE_PDL:
                gdc_wait()  # x, out and the work space come from the kernels before this one
            if rank > 0:  # a slice this adapter does not adapt: nothing to add
                r_mask = offs_r < rank
                ys = _block_y(x_ptr, a_ptr, ws_ptr, x_rows, m_mask, ws_rows, j, 0, row0, offs_r, r_mask, weight,
                              K, splits, a_stride_j, a_stride_row, ws_stride_split, ws_stride_pair, lora_dtype,
                              FUSED, BLOCK_M, BLOCK_K, BLOCK_R, SPLIT_BLOCK, EVEN_K, PRECISION)
                bt_rows = bt_ptr + (row0 + offs_r).to(tl.int64) * bt_stride_row
                # out tiles are read one tile ahead (the compiler cannot hoist a load above the previous
                # tile's store); B^T tiles are pipelined by the compiler.
                offs_n = tile_lo * BLOCK_N + offs_tile
                o_mask = m_mask[:, None] & (offs_n < n_len)[None, :] & (tile_lo < tile_hi)
                o_next = tl.load(o_rows[:, None] + (n_off + offs_n)[None, :], mask=o_mask, other=0.0)
                for tile in range(tile_lo, tile_hi):
                    offs_n = tile * BLOCK_N + offs_tile
                    n_mask = offs_n < n_len
                    cols = n_off + offs_n
                    o = o_next
                    ahead = offs_n + BLOCK_N
                    o_next = tl.load(o_rows[:, None] + (n_off + ahead)[None, :],
                                     mask=m_mask[:, None] & (ahead < n_len)[None, :] & (tile + 1 < tile_hi),
                                     other=0.0)
                    bt = tl.load(bt_rows[:, None] + cols[None, :], mask=r_mask[:, None] & n_mask[None, :],
                                 other=0.0)
                    acc = tl.dot(ys, bt, o.to(tl.float32), input_precision=PRECISION)
                    tl.store(o_rows[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                             mask=m_mask[:, None] & n_mask[None, :])
        else:
            num_pairs = tl.load(rec + 3)
            if USE_PDL:
                gdc_wait()
            # Phase A: every (pair, rank chunk)'s rounded weighted y into this program's scratch.
            for p in range(num_pairs):
                slot = tl.load(rec + 4 + p)
                weight = tl.load(weights_ptr + b * record_stride + weights_col + p)
                rank = tl.load(rank_ptr + j * num_slots + slot)
                row0 = tl.load(row_start_ptr + slot)
                for r0 in range(0, rank, BLOCK_R):
                    rows = r0 + offs_r
                    ys = _block_y(x_ptr, a_ptr, ws_ptr, x_rows, m_mask, ws_rows, j, p, row0, rows, rows < rank,
                                  weight, K, splits, a_stride_j, a_stride_row, ws_stride_split, ws_stride_pair,
                                  lora_dtype, FUSED, BLOCK_M, BLOCK_K, BLOCK_R, SPLIT_BLOCK, EVEN_K, PRECISION)
                    tl.store(scratch_tile + (p * rank_chunks + r0 // BLOCK_R) * chunk_elems, ys)
            tl.debug_barrier()  # phase A's stores are visible to every thread of the program
            # Phase B: each tile sums every pair and rank chunk in a fixed order, then one rounding into out.
            for tile in range(tile_lo, tile_hi):
                offs_n = tile * BLOCK_N + offs_tile
                n_mask = offs_n < n_len
                cols = n_off + offs_n
                o_mask = m_mask[:, None] & n_mask[None, :]
                acc = tl.load(o_rows[:, None] + cols[None, :], mask=o_mask, other=0.0).to(tl.float32)
                for p in range(num_pairs):
                    slot = tl.load(rec + 4 + p)
                    rank = tl.load(rank_ptr + j * num_slots + slot)
                    row0 = tl.load(row_start_ptr + slot)
                    for r0 in range(0, rank, BLOCK_R):
                        rows = r0 + offs_r
                        ys = tl.load(scratch_tile + (p * rank_chunks + r0 // BLOCK_R) * chunk_elems)
                        bt = tl.load(bt_ptr + (row0 + rows).to(tl.int64)[:, None] * bt_stride_row + cols[None, :],
                                     mask=(rows < rank)[:, None] & n_mask[None, :], other=0.0)
                        acc = tl.dot(ys, bt, acc, input_precision=PRECISION)
                tl.store(o_rows[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.debug_barrier()  # the next item's phase A overwrites the scratch
    if USE_PDL:
        gdc_wait()  # every program waits before it exits, items or not (see triton_shrink.pdl_options)


def _plan_steps(max_tiles: int) -> int:
    """Candidates 1, 2, 4, ... up to and including max_tiles."""
    return max_tiles.bit_length() + 1


def split_block(config: LoraKernelConfig, block_m: int) -> int:
    """Split-K planes the expand loads per round (unrolled): all of them (a power of two >= max_split) while
    planes x block_m x block_r fp32 stay within 8192 elements (64 registers a thread at 4 warps)."""
    cap = max(1, 8192 // (block_m * config.block_r))
    planes = 1
    while planes < config.max_split and 2 * planes <= cap:
        planes *= 2
    return planes


def _launch(x: torch.Tensor | None, ws: torch.Tensor | None, group: LoraGroupStacks, meta: LoraStepMeta,
            out: torch.Tensor, config: LoraKernelConfig, rank_bound: int) -> torch.Tensor:
    assert out.stride(1) == 1 and group.bt_pool.stride(1) == 1 and group.num_slices <= MAX_SLICES
    fused = ws is None
    if fused:
        assert x.dtype == group.a_pool.dtype and x.stride(1) == 1 and group.a_pool.stride(2) == 1
    blocks = num_token_blocks(meta, out.shape[0])
    if blocks == 0:
        return out
    offs, lens = list(group.slice_offsets), list(group.out_features)
    tiles = [-(-n // config.block_n) for n in lens]
    all_tiles, max_tiles = sum(tiles), max(tiles)
    pad = MAX_SLICES - len(lens)
    offs, lens = offs + [0] * pad, lens + [0] * pad
    programs = max(1, min(config.programs, blocks * all_tiles))
    pairs = meta.launch_pairs
    rank_chunks = -(-rank_bound // config.block_r)
    fast = pairs == 1 and rank_chunks == 1
    dummy = out  # pointer arguments a variant never dereferences
    scratch = dummy if fast else torch.empty(programs, pairs * rank_chunks, meta.block_m, config.block_r,
                                             dtype=group.bt_pool.dtype, device=out.device)
    k_in = group.shape.in_features
    xs = x if fused else dummy
    wss = dummy if fused else ws
    ws_strides = (0, 0, 0, 0) if fused else (ws.stride(0), ws.stride(1), ws.stride(2), ws.stride(3))
    _expand_kernel[(programs,)](
        xs, group.a_pool, wss, group.bt_pool, out, scratch, group.rank, group.row_start,
        meta.header, meta.block_records, meta.block_records.view(torch.float32), meta.token_order,
        meta.record_stride, 4 + meta.pair_capacity, group.num_slots, group.num_slices, k_in, float(config.l2_streams),
        config.split_programs, config.max_split, rank_chunks, _plan_steps(max_tiles),
        xs.stride(0), group.a_pool.stride(0), group.a_pool.stride(1), *ws_strides,
        group.bt_pool.stride(0), out.stride(0), 0 if fast else scratch.stride(0),
        *offs, *lens,
        FUSED=fused, FAST=fast, BLOCK_M=meta.block_m, BLOCK_K=config.block_k, BLOCK_R=config.block_r,
        BLOCK_N=config.block_n, SPLIT_BLOCK=split_block(config, meta.block_m),
        EVEN_K=k_in % config.block_k == 0, PRECISION=precision(group.bt_pool.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(config, out))
    return out


def lora_expand(ws: torch.Tensor, group: LoraGroupStacks, meta: LoraStepMeta, out: torch.Tensor,
                config: LoraKernelConfig, rank_bound: int) -> torch.Tensor:
    """out[token_order[pos], n0_j + n] +=
           sum_p sum_{r < rank[j, s]} rnd(w_p * sum_k ws[k, j, pos, p, r]) * bt_pool[row_start[s] + r, n0_j + n]

    for every used block's positions pos (pairs p < its num_pairs with slot s, weight w_p), slice j,
    n < N_j; the sum over p and r in fp32, then one rounding into out's dtype. rnd rounds to the pools'
    dtype (identity for fp32). ws: `triton_shrink.lora_shrink`'s work space for the same meta, config
    and rank_bound; out: [T, N_total] (bf16/fp16/fp32), last dim contiguous, mutated and returned. Base
    rows untouched.
    """
    return _launch(None, ws, group, meta, out, config, rank_bound)


def lora_fused(x: torch.Tensor, group: LoraGroupStacks, meta: LoraStepMeta, out: torch.Tensor,
               config: LoraKernelConfig, rank_bound: int) -> torch.Tensor:
    """The whole op in one launch: out[token_order[pos], n0_j + n] +=
           sum_p sum_{r < rank[j, s]} rnd(w_p * x[token_order[pos]] @ a_pool[j, row_start[s] + r]) * bt_pool[...]

    (same contract as lora_shrink + lora_expand; x @ A^T summed over all of K in one program, in BLOCK_K
    steps). x: [T, K_in] in the pools' dtype, last dim contiguous."""
    return _launch(x, None, group, meta, out, config, rank_bound)
