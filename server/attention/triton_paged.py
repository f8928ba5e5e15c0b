"""Paged attention and KV writes in Triton: K/V read where they are, through the block table.

Semantics, shapes and dtypes: exactly `reference.paged_attention` / `reference.write_kv` (GQA, causal
within the chunk, optional sliding window q_pos - window < k_pos <= q_pos, softmax in fp32).

Why Triton: FlashInfer is not installed on the device's stack (torch 2.11 + cu130, nothing can be
downloaded there), so this is our own kernel in the style of vLLM's triton unified attention:
  - one launch serves decode, chunked prefill and mixed steps: programs over (query block, KV head); a
    query block is BLOCK_Q tokens of one sequence x the GROUP query heads of one KV head, packed into the
    tile's M = BLOCK_M rows (row m: token m // GROUP, head m % GROUP); each program finds its sequence by
    a binary search over query_start and exits when it has no rows, so the grid, T // BLOCK_Q + B, depends
    only on the (padded) shapes: CUDA-graph safe, no host sync;
  - K/V tiles of BLOCK_N keys are gathered per key through the block table (any power-of-two page size);
    loads are masked to the keys the block needs, so unused blocks and cache positions are never read;
  - online softmax in fp32 (exp2, scale folded), tl.dot for QK^T and PV (IEEE fp32 for fp32 models),
    the key loop stops at the block's causal limit and starts at its sliding-window start;
  - split-KV (flash-decoding) for decode steps with too few (sequence, KV head) programs to fill the GPU:
    NUM_SEGMENTS programs per query block each take a fixed share of the key tiles and write (acc, max,
    sum) partials; a second kernel merges them in a fixed order (deterministic).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..buckets import batch_bucket

from .meta import AttentionStepMeta

LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    block_m: int
    """Tile rows: query tokens x GROUP query heads (power of two, >= 16, >= GROUP)."""
    block_n: int
    """Keys per tile (power of two, >= 16)."""
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _find_seq(query_start_ptr, q_block_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first query block, query_start[b] // BLOCK_Q + b, is <= q_block_idx."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= q_block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "window"])  # num_seqs == 1 would become a constexpr
def _paged_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
        part_acc_ptr, part_stat_ptr, scale_log2, num_seqs, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_bt,
        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SEGMENTS: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    q_block_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq = _find_seq(query_start_ptr, q_block_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    q_block = q_block_idx - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens cached before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_idx = q_block * BLOCK_Q + offs_m // GROUP  # row -> query index within the chunk
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)
    d_ok = offs_d < HEAD_DIM
    q_pos = context + q_idx
    token = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # keys any row of this block may see: [key_lo, key_hi)
    key_hi = context + tl.minimum((q_block + 1) * BLOCK_Q, q_len)
    key_lo = 0
    if USE_WINDOW:
        key_lo = tl.maximum(context + q_block * BLOCK_Q - window + 1, 0)
    tile_lo = key_lo // BLOCK_N
    tile_hi = tl.cdiv(key_hi, BLOCK_N)
    if NUM_SEGMENTS > 1:
        per_segment = tl.cdiv(tile_hi - tile_lo, NUM_SEGMENTS)
        tile_lo = tile_lo + segment * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, tile_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= key_lo) & (offs_n < key_hi)
        block = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        in_block = offs_n % BLOCK_SIZE
        k = tl.load(k_cache_ptr + block[None, :] * stride_kb + in_block[None, :] * stride_kt
                    + kv_head * stride_kh + offs_d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N], log2 units
        allowed = key_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + in_block[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    store_ok = row_ok[:, None] & d_ok[None, :]
    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_ok)
    else:  # partials [T, NUM_HEADS, NUM_SEGMENTS, (HEAD_DIM_PAD | 2)], fp32
        part = (token * NUM_HEADS + head) * NUM_SEGMENTS + segment
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=store_ok)
        tl.store(part_stat_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_stat_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_segments_kernel(out_ptr, part_acc_ptr, part_stat_ptr, stride_ot, stride_oh,
                           NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                           NUM_SEGMENTS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    part = (token * NUM_HEADS + head) * NUM_SEGMENTS + offs_s
    m = tl.load(part_stat_ptr + part * 2)
    l = tl.load(part_stat_ptr + part * 2 + 1)
    m_max = tl.max(m, 0)
    weight = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty segments: 0
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :])
    acc = tl.where(weight[:, None] > 0.0, acc, 0.0)
    total = tl.sum(l * weight, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def _write_kv_kernel(k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, kv_index_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
                     BLOCK_SIZE: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    index = tl.load(kv_index_ptr + token)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    ok = (offs_h < KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (index // BLOCK_SIZE) * stride_cb + (index % BLOCK_SIZE) * stride_ct \
        + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
    tl.store(k_cache_ptr + dst, k, mask=ok)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
    tl.store(v_cache_ptr + dst, v, mask=ok)


def default_config(decode_only: bool, group: int, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """Decode: the smallest M tile that holds a KV group (one token per sequence); prefill: 64-row tiles."""
    min_m = max(16, triton.next_power_of_2(group))
    block_n = 32 if dtype == torch.float32 and head_dim > 64 else 64
    if decode_only:
        return LaunchConfig(block_m=min_m, block_n=block_n, num_warps=4, num_stages=2)
    return LaunchConfig(block_m=max(64, min_m), block_n=block_n, num_warps=4, num_stages=2)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_segments(meta: AttentionStepMeta, kv_heads: int, device: torch.device) -> int:
    """Split the keys only for decode steps whose (sequence, KV head) programs fill less than one wave;
    a function of the (padded) batch size alone, so each graph bucket has one fixed choice."""
    if not meta.decode_only or device.type != "cuda":
        return 1
    # by the batch bucket, not the batch: an eager decode step and its padded graph split alike
    programs, sms = batch_bucket(meta.num_seqs) * kv_heads, _sm_count(device.index or 0)
    if programs >= sms:
        return 1
    return min(32, triton.next_power_of_2(-(-2 * sms // programs)))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionStepMeta,
                    scale: float, sliding_window: int | None = None, *, num_segments: int | None = None,
                    config: LaunchConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring; q: [T, Hq, D] (last dim contiguous) -> [T, Hq, D] in q's dtype (written
    into `out` when given). num_segments (a power of two) and config override the defaults."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert num_heads % kv_heads == 0 and k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert k_cache.dtype == v_cache.dtype == q.dtype
    group = num_heads // kv_heads
    cfg = config or default_config(meta.decode_only, group, head_dim, q.dtype)
    block_q = cfg.block_m // group
    assert block_q >= 1, "block_m must hold one KV group"
    segments = num_segments or default_num_segments(meta, kv_heads, q.device)
    assert segments & (segments - 1) == 0, "num_segments must be a power of two"
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    if segments > 1:
        part_acc = torch.empty((num_tokens, num_heads, segments, head_dim_pad), dtype=torch.float32, device=q.device)
        part_stat = torch.empty((num_tokens, num_heads, segments, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_stat = out  # unused
    grid = (num_tokens // block_q + meta.num_seqs, kv_heads, segments)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, meta.block_tables, meta.query_start, meta.seq_lens, part_acc, part_stat,
        scale * LOG2E, meta.num_seqs, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        meta.block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n, NUM_SEGMENTS=segments,
        USE_WINDOW=sliding_window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if segments > 1:
        _merge_segments_kernel[(num_tokens, num_heads)](
            out, part_acc, part_stat, out.stride(0), out.stride(1), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad, NUM_SEGMENTS=segments, num_warps=4)
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kv_index: torch.Tensor) -> None:
    """Same as `reference.write_kv`, K and V in one launch; k, v: [T, Hkv, D], last dim contiguous."""
    num_tokens, kv_heads, head_dim = k.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.shape[2:] == k.shape[1:] and v.shape == k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k_cache, v_cache, k, v, kv_index, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], BLOCK_SIZE=k_cache.shape[1], KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(kv_heads), HEAD_DIM_PAD=triton.next_power_of_2(head_dim), num_warps=4)
