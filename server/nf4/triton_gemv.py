"""GEMV-style NF4 kernel for a few rows (M <= 4): CUDA-core FMAs, split-K, fp32 accumulation, no atomics.

    y[m, n] = sum_k x[m, k] * W[n, k]          (W[n, k] rounded to x's dtype first, as bitsandbytes dequantizes)

Each program owns BN output columns x BM rows of x x one K chunk; it streams the columns' packed bytes once,
keeps elementwise fp32 partial products [BM, BN, NB, 32] (even and odd k folded together) and sums them once at
the end. With split-K the chunk sums go to a [SPLIT, M, N] fp32 workspace, reduced in fixed order by
`triton_common.reduce_kernel`. On an H200 the tensor-core kernel (`triton_gemm`, SWAP_AB) usually wins even at
M = 1 (fewer instructions per weight); the tuner picks.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import triton_common as tc
from . import triton_decode as td

_DYNAMIC = ["M", "N_OUT", "N_ROWS", "N_GATE", "stride_xm", "K_SPLIT", "write_partial",
            "b1", "b2", "b3", "s1", "s2", "s3"]


@triton.jit
def _accumulate(acc, x_even, x_odd, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab, rows, seg, loc,
                a2s, off, kb, KB64, OUT_DTYPE: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr):
    w_even, w_odd = tc.dequant_halves(packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab, rows, seg, loc,
                                      a2s, off, kb, KB64, OUT_DTYPE, EXACT, ASM)  # [BN, NB, 32] each
    return acc + x_even * w_even.to(tl.float32)[None, :, :, :] + x_odd * w_odd.to(tl.float32)[None, :, :, :]


@triton.jit(do_not_specialize=_DYNAMIC)
def gemv_kernel(x_ptr, out_ptr, part_ptr, bias_ptr, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                code_ptr, M, N_OUT, N_ROWS, N_GATE, K, stride_xm, K_SPLIT, write_partial, b1, b2, b3, s1, s2, s3,
                BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, GATED: tl.constexpr,
                HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr):
    """Grid (cdiv(M, BM), cdiv(N_OUT, BN), SPLIT). Gated: columns n read weight rows n (gate) and N_GATE + n (up)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    KB64 = K // 64
    m_idx = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rows_a = tl.minimum(cols, N_OUT - 1)
    seg_a, loc_a, a2s_a, off_a = tc.row_segments(rows_a, b1, b2, b3, s1, s2, s3, offset_ptr, KB64)
    rows_b = rows_a + N_GATE
    seg_b, loc_b, a2s_b, off_b = tc.row_segments(rows_b, b1, b2, b3, s1, s2, s3, offset_ptr, KB64)
    tab = td.lane_code(code_ptr, ASM)
    acc_a = tl.zeros([BM, BN, NB, 32], dtype=tl.float32)
    acc_b = tl.zeros([BM, BN, NB, 32], dtype=tl.float32)
    kb0 = pid_k * (K_SPLIT // 64)
    kb_end = tl.minimum(kb0 + K_SPLIT // 64, KB64)
    e = tl.arange(0, 64)
    for it in range(0, K_SPLIT // (NB * 64)):  # a trip count independent of the program (the interpreter needs it)
        kbs = kb0 + it * NB
        kb = kbs + tl.arange(0, NB)
        x_mask = (m_idx < M)[:, None, None, None] & (kb < kb_end)[None, None, :, None]
        x_ptrs = x_ptr + m_idx[:, None, None, None] * stride_xm + kb[None, None, :, None] * 64 + e[None, None, None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)  # [BM, 1, NB, 64]
        x_even, x_odd = tl.split(tl.reshape(x, [BM, 1, NB, 32, 2]))
        kb = tl.minimum(kb, KB64 - 1)
        acc_a = _accumulate(acc_a, x_even, x_odd, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab,
                            rows_a, seg_a, loc_a, a2s_a, off_a, kb, KB64, OUT_DTYPE, EXACT, ASM)
        if GATED:
            acc_b = _accumulate(acc_b, x_even, x_odd, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, code_ptr, tab,
                                rows_b, seg_b, loc_b, a2s_b, off_b, kb, KB64, OUT_DTYPE, EXACT, ASM)
    sum_a = tl.sum(tl.sum(acc_a, axis=3), axis=2)  # [BM, BN]
    sum_b = tl.sum(tl.sum(acc_b, axis=3), axis=2)
    tc.store_tile(out_ptr, part_ptr, bias_ptr, sum_a, sum_b, m_idx, cols, M, N_OUT, N_ROWS, N_GATE, pid_k,
                  write_partial, GATED, HAS_BIAS, OUT_DTYPE)
