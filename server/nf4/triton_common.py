"""Triton building blocks shared by the NF4 kernels: segment lookup, absmax, nibble decoding, epilogue.

Semantics are those of `format.NF4Weight`. All helpers work on a tile of weight rows `rows` [BN] and a range of
64-element blocks `kb` [NB] of those rows (kernels require K % 64 == 0, so blocks never straddle rows). Callers
clamp rows and blocks into range, so weight loads need no masks: out-of-range rows are never stored and
out-of-range blocks meet activations loaded as zeros.
`EXACT` (True on CUDA) multiplies the nested absmax with an explicit `mul.rn.f32` (inline PTX: never contracted
into an FMA with the offset addition, never flushed to zero): bitsandbytes rounds the product and the sum
separately. The interpreter never fuses.
`ASM` selects the shuffle-based nibble decoder of `triton_decode` (CUDA, bf16/fp16 outputs).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_decode import decode_halves, mul_rn


@triton.jit
def row_segments(rows, b1, b2, b3, s1, s2, s3, offset_ptr, KB64):
    """Per weight row [BN]: (segment, first segment-local block of the row, its absmax2 start, its offset).

    b1..b3: first row of segments 1..3 (N when absent); s1..s3: their absmax2 starts.
    """
    seg = (rows >= b1).to(tl.int32) + (rows >= b2).to(tl.int32) + (rows >= b3).to(tl.int32)
    row0 = tl.where(seg == 0, 0, tl.where(seg == 1, b1, tl.where(seg == 2, b2, b3)))
    a2s = tl.where(seg == 0, 0, tl.where(seg == 1, s1, tl.where(seg == 2, s2, s3)))
    off = tl.load(offset_ptr + seg)
    return seg, (rows - row0) * KB64, a2s, off


@triton.jit
def block_absmax(absq_ptr, code2_ptr, absmax2_ptr, rows, seg, loc_blk0, a2s, off, kb, KB64, EXACT: tl.constexpr):
    """fp32 [BN, NB]: absmax of block kb of each row, with bitsandbytes' two roundings."""
    q = tl.load(absq_ptr + rows[:, None] * KB64 + kb[None, :]).to(tl.int32)
    c2 = tl.load(code2_ptr + seg[:, None] * 256 + q)
    a2 = tl.load(absmax2_ptr + a2s[:, None] + (loc_blk0[:, None] + kb[None, :]) // 256)
    return mul_rn(c2, a2, EXACT) + off[:, None]


@triton.jit
def dequant_halves(packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab, rows, seg, loc_blk0, a2s, off, kb,
                   KB64, OUT_DTYPE: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr):
    """(even, odd) [BN, NB, 32] in OUT_DTYPE: W[rows, 64*kb + 2j] and W[rows, 64*kb + 2j + 1] (rows, kb in range;
    tab: `triton_decode.lane_code`)."""
    j = tl.arange(0, 32)
    ptrs = packed_ptr + rows[:, None, None] * (KB64 * 32) + kb[None, :, None] * 32 + j[None, None, :]
    packed = tl.load(ptrs, eviction_policy="evict_first")
    am = block_absmax(absq_ptr, code2_ptr, absmax2_ptr, rows, seg, loc_blk0, a2s, off, kb, KB64, EXACT)
    return decode_halves(packed, am[:, :, None], code_ptr, tab, OUT_DTYPE, EXACT, ASM)


@triton.jit
def finish(acc_a, acc_b, bias_ptr, cols, col_ok, N_GATE, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
           OUT_DTYPE: tl.constexpr):
    """Output values in OUT_DTYPE from fp32 sums [BM, BN] (columns `cols`).

    Plain: OUT(acc_a + bias[cols]). Gated (acc_a = gate, acc_b = up, rows cols and N_GATE + cols):
    g = OUT(acc_a + bias), u = OUT(acc_b + bias_up), OUT(OUT(silu(g)) * u), rounded like the unfused MLP.
    """
    if HAS_BIAS:
        acc_a += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_BIAS:
            acc_b += tl.load(bias_ptr + N_GATE + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        g = acc_a.to(OUT_DTYPE).to(tl.float32)
        u = acc_b.to(OUT_DTYPE).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(OUT_DTYPE).to(tl.float32)
        return (s * u).to(OUT_DTYPE)
    else:
        return acc_a.to(OUT_DTYPE)


@triton.jit
def store_tile(out_ptr, part_ptr, bias_ptr, acc_a, acc_b, m_idx, cols, M, N_OUT, N_ROWS, N_GATE, pid_k, write_partial,
               GATED: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Store fp32 sums [BM, BN]: when write_partial (runtime), the split-K partials part[pid_k, m, row]
    (row = cols, and N_GATE + cols when gated); else the finished output out[m, cols] ([M, N_OUT], contiguous)."""
    col_ok = cols < N_OUT
    mask = (m_idx[:, None] < M) & col_ok[None, :]
    if write_partial != 0:
        base = part_ptr + pid_k.to(tl.int64) * M * N_ROWS + m_idx[:, None] * N_ROWS + cols[None, :]
        tl.store(base, acc_a, mask=mask)
        if GATED:
            tl.store(base + N_GATE, acc_b, mask=mask)
    else:
        y = finish(acc_a, acc_b, bias_ptr, cols, col_ok, N_GATE, GATED, HAS_BIAS, OUT_DTYPE)
        tl.store(out_ptr + m_idx[:, None] * N_OUT + cols[None, :], y, mask=mask)


@triton.jit
def reduce_kernel(part_ptr, out_ptr, bias_ptr, M, N_OUT, N_ROWS, N_GATE, SPLIT,
                  BM: tl.constexpr, BN: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  OUT_DTYPE: tl.constexpr):
    """out[m, n] = finish(sum over s = 0, 1, .. SPLIT-1 in this order of part[s, m, n] (, part[s, m, N_GATE + n]))."""
    m_idx = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < N_OUT
    mask = (m_idx[:, None] < M) & col_ok[None, :]
    ptrs = part_ptr + m_idx[:, None] * N_ROWS + cols[None, :]
    acc_a = tl.zeros([BM, BN], dtype=tl.float32)
    acc_b = tl.zeros([BM, BN], dtype=tl.float32)
    for s in range(0, SPLIT):
        acc_a += tl.load(ptrs + s * M * N_ROWS, mask=mask, other=0.0)
        if GATED:
            acc_b += tl.load(ptrs + s * M * N_ROWS + N_GATE, mask=mask, other=0.0)
    y = finish(acc_a, acc_b, bias_ptr, cols, col_ok, N_GATE, GATED, HAS_BIAS, OUT_DTYPE)
    tl.store(out_ptr + m_idx[:, None] * N_OUT + cols[None, :], y, mask=mask)
