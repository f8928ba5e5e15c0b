"""Tiled NF4 GEMM on tensor cores (`tl.dot`) for M up to ~128, split-K, fp32 accumulation, no atomics.

    y[m, n] = sum_k x[m, k] * W[n, k]          (W[n, k] rounded to x's dtype first, as bitsandbytes dequantizes)

Each program dequantizes a [BN, BK] weight tile in registers (bf16/fp16 operands; fp32 operands use
input_precision="ieee" so fp32 models keep PEFT parity) and multiplies it with the [BM, BK] activation tile as two
half-K products (even k: high nibbles, odd k: low nibbles), so decoded values never need re-interleaving.
SWAP_AB computes the transposed tile W x^T ([BN, BM]) so a small M sits in the MMA's narrow N dimension.
With split-K the chunk sums go to a [SPLIT, M, N] fp32 workspace, reduced in fixed order.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import triton_common as tc
from . import triton_decode as td

_DYNAMIC = ["M", "N_OUT", "N_ROWS", "N_GATE", "stride_xm", "K_SPLIT", "write_partial",
            "b1", "b2", "b3", "s1", "s2", "s3"]


@triton.jit
def _mma(acc, x_even, x_odd, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab, rows, seg, loc, a2s, off,
         kb, KB64, BN: tl.constexpr, BK: tl.constexpr, SWAP_AB: tl.constexpr, OUT_DTYPE: tl.constexpr,
         EXACT: tl.constexpr, ASM: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += x W^T over one BK step, as two half-K products: even k (high nibbles) and odd k (low nibbles)."""
    w_even, w_odd = tc.dequant_halves(packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab, rows, seg, loc,
                                      a2s, off, kb, KB64, OUT_DTYPE, EXACT, ASM)
    w_even = tl.reshape(w_even, [BN, BK // 2])
    w_odd = tl.reshape(w_odd, [BN, BK // 2])
    if SWAP_AB:
        acc = tl.dot(w_even, tl.trans(x_even), acc, input_precision=INPUT_PRECISION)
        return tl.dot(w_odd, tl.trans(x_odd), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision=INPUT_PRECISION)
        return tl.dot(x_odd, tl.trans(w_odd), acc, input_precision=INPUT_PRECISION)


@triton.jit(do_not_specialize=_DYNAMIC)
def gemm_kernel(x_ptr, out_ptr, part_ptr, bias_ptr, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                code_ptr, M, N_OUT, N_ROWS, N_GATE, K, stride_xm, K_SPLIT, write_partial, b1, b2, b3, s1, s2, s3,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP_AB: tl.constexpr, GATED: tl.constexpr,
                HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """Grid (cdiv(M, BM), cdiv(N_OUT, BN), SPLIT). Gated: columns n read weight rows n (gate) and N_GATE + n (up)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    NB: tl.constexpr = BK // 64
    KB64 = K // 64
    m_idx = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rows_a = tl.minimum(cols, N_OUT - 1)
    seg_a, loc_a, a2s_a, off_a = tc.row_segments(rows_a, b1, b2, b3, s1, s2, s3, offset_ptr, KB64)
    rows_b = rows_a + N_GATE
    seg_b, loc_b, a2s_b, off_b = tc.row_segments(rows_b, b1, b2, b3, s1, s2, s3, offset_ptr, KB64)
    tab = td.lane_code(code_ptr, ASM)
    if SWAP_AB:
        acc_a = tl.zeros([BN, BM], dtype=tl.float32)
        acc_b = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc_a = tl.zeros([BM, BN], dtype=tl.float32)
        acc_b = tl.zeros([BM, BN], dtype=tl.float32)
    kb0 = pid_k * (K_SPLIT // 64)
    kb_end = tl.minimum(kb0 + K_SPLIT // 64, KB64)
    k = tl.arange(0, BK)
    m_ok = m_idx < M
    for it in range(0, K_SPLIT // BK):  # a trip count independent of the program (the interpreter needs it)
        kbs = kb0 + it * NB
        x_mask = m_ok[:, None] & (kbs * 64 + k < kb_end * 64)[None, :]
        x = tl.load(x_ptr + m_idx[:, None] * stride_xm + (kbs * 64 + k)[None, :], mask=x_mask, other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, [BM, BK // 2, 2]))
        kb = tl.minimum(kbs + tl.arange(0, NB), KB64 - 1)
        acc_a = _mma(acc_a, x_even, x_odd, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab, rows_a,
                     seg_a, loc_a, a2s_a, off_a, kb, KB64, BN, BK, SWAP_AB, OUT_DTYPE, EXACT, ASM, INPUT_PRECISION)
        if GATED:
            acc_b = _mma(acc_b, x_even, x_odd, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab, rows_b,
                         seg_b, loc_b, a2s_b, off_b, kb, KB64, BN, BK, SWAP_AB, OUT_DTYPE, EXACT, ASM, INPUT_PRECISION)
    if SWAP_AB:
        sum_a = tl.trans(acc_a)
        sum_b = tl.trans(acc_b)
    else:
        sum_a = acc_a
        sum_b = acc_b
    tc.store_tile(out_ptr, part_ptr, bias_ptr, sum_a, sum_b, m_idx, cols, M, N_OUT, N_ROWS, N_GATE, pid_k,
                  write_partial, GATED, HAS_BIAS, OUT_DTYPE)
