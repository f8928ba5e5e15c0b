"""Small-M NF4 matmul on tensor cores with each 64-block's absmax factored out (Gluon: CUDA, sm_80+).

    y[m, n] = sum_b absmax[n, b] * sum_{k in block b} x[m, k] * code[nibble(n, k)]          (fp32 sums)

The 16 NF4 codes are rounded once to x's dtype (bf16: relative error <= 2^-9, like bitsandbytes' own bf16
weights; fp16: <= 2^-12); the absmax is bitsandbytes' exact fp32 value (two roundings, see `format`), applied in
fp32 to each block's tensor-core partial sum. So the products differ from "dequantize, then matmul" only by where
the weight is rounded (code vs code * absmax): see `tests/nf4` for the bound.

Per weight byte (two elements) the hot loop issues one PRMT and one LDS: the byte, with this lane's offset, is the
shared-memory address of a (code[hi], code[lo]) pair in a 64 KiB table (256 byte values x 32 lane copies, one
bank per lane: conflict-free), which is already the register an `mma.m16n8k16` A fragment wants. No shuffles, no
multiplies, no conversions per element. The K order inside each 64-block is permuted (the same way for W and x,
so the sum is unchanged) such that a lane's A fragments come from 8 contiguous bytes of a row (one 8-byte load)
and its B fragments from 16 contiguous x values; the permutation is a reshape/permute of register tensors, which
Gluon checks to be free (`assert_trivial`).

Warps split rows (WN) and K (KW: their partial sums are added once at the end, in a fixed order); NB blocks per
step form a register batch of `mma_v2`; the next step's bytes are loaded before the current step is used. Grid:
(row tiles, split-K chunks); split chunks write fp32 partials reduced by `triton_common.reduce_kernel`.
Deterministic, no atomics, no host sync: CUDA-graph capturable. The table is written by each CTA at its start
(64 KiB of shared memory, one barrier); nothing else touches shared memory until a barrier after the loop.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

LUT_BYTES = 65536
"""Shared memory of the pair table: entry e (a byte value) of lane l at byte e * 256 + 4 * l (128 of 256 used)."""

LANE_OFFSET: gl.constexpr = gl.constexpr("{ .reg .u32 l; mov.u32 l, %laneid; shl.b32 $0, l, 2; }")
# 4 * lane ($1 is unused: inline asm needs an operand)

LOOKUP_LDS: gl.constexpr = gl.constexpr(r"""
{
.reg .b32 a<4>, base;
mov.u32 base, global_smem;
prmt.b32 a0, $4, $5, 0x7604;
prmt.b32 a1, $4, $5, 0x7614;
prmt.b32 a2, $4, $5, 0x7624;
prmt.b32 a3, $4, $5, 0x7634;
add.u32 a0, a0, base;
add.u32 a1, a1, base;
add.u32 a2, a2, base;
add.u32 a3, a3, base;
ld.shared.b32 $0, [a0];
ld.shared.b32 $1, [a1];
ld.shared.b32 $2, [a2];
ld.shared.b32 $3, [a3];
}
""")
# $4: a word of 4 weight bytes; $5: 4 * lane (< 256, upper bytes 0). prmt 0x76k4 makes [4 * lane, byte k, 0, 0],
# the byte offset of entry `byte k` of this lane's copy. $0..$3: the code pairs of bytes 0..3.

_LANE = r"""
{
.reg .u32 l; .reg .u64 a; .reg .f32 f; .reg .b16 h;
mov.u32 l, %laneid; and.b32 l, l, 15; mad.wide.u32 a, l, 4, $1;
ld.global.nc.f32 f, [a]; cvt.rn.TYPE.f32 h, f; mov.b32 $0, {h, h};
}
"""
LANE_BF16: gl.constexpr = gl.constexpr(_LANE.replace("TYPE", "bf16"))
LANE_F16: gl.constexpr = gl.constexpr(_LANE.replace("TYPE", "f16"))
# this lane's code[lane % 16], rounded, in both halves

LOOKUP_SHFL: gl.constexpr = gl.constexpr(r"""
{
.reg .b32 s<7>, h<8>;
shr.b32 s0, $4, 4;
shr.b32 s1, $4, 8;
shr.b32 s2, $4, 12;
shr.b32 s3, $4, 16;
shr.b32 s4, $4, 20;
shr.b32 s5, $4, 24;
shr.b32 s6, $4, 28;
shfl.sync.idx.b32 h1, $5, $4, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h0, $5, s0, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h3, $5, s1, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h2, $5, s2, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h5, $5, s3, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h4, $5, s4, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h7, $5, s5, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h6, $5, s6, 0x100F, 0xFFFFFFFF;
prmt.b32 $0, h0, h1, 0x5410;
prmt.b32 $1, h2, h3, 0x5410;
prmt.b32 $2, h4, h5, 0x5410;
prmt.b32 $3, h6, h7, 0x5410;
}
""")
# The same pairs from warp shuffles (no shared memory): the segment mask 0x10 makes the source lane
# (lane & 16) | (index & 15), so only the nibble matters.

MUL_RN: gl.constexpr = gl.constexpr("mul.rn.f32 $0, $1, $2;")


def _lg(n: int) -> int:
    return n.bit_length() - 1


@lru_cache(maxsize=None)
def layouts(kw: int, wn: int, rt: int, nb: int, bmp: int) -> dict:
    """Register layouts of one configuration (Python objects, passed as constexprs).

    Batch index b of the [NB * KW, ...] operands = nb * KW + kw: the block nb of the step, split-K warp kw.
    LW: weight words [NBB, BN, 8] (int32): lane (g, t) holds words 2t, 2t+1 (bytes 8t..8t+7) of rows g, g+8.
    LX: x [NBB, BMP, 64]: lane (g, t) holds x[g (+8j), 16t .. 16t+15].
    LC: block absmax [NBB, BN], each value computed by one lane of a quad; LA (its use) repeats it on all four.
    """
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[kw, wn, 1], instr_shape=[1, 16, 8])
    bn = 16 * wn * rt
    warps_rows = [[0, 16 << i, 0] for i in range(_lg(wn))]
    warps_k = [[1 << i, 0, 0] for i in range(_lg(kw))]
    lw = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 8, 0]] + [[0, (16 * wn) << i, 0] for i in range(_lg(rt))]
        + [[kw << i, 0, 0] for i in range(_lg(nb))],
        lane_bases=[[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=warps_rows + warps_k, block_bases=[], shape=[nb * kw, bn, 8])
    lx = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8]] + [[0, 8 << i, 0] for i in range(_lg(bmp // 8))]
        + [[kw << i, 0, 0] for i in range(_lg(nb))],
        lane_bases=[[0, 0, 16], [0, 0, 32], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=[[0, 0, 0]] * _lg(wn) + warps_k, block_bases=[], shape=[nb * kw, bmp, 64])
    # LA = SliceLayout(2, MMA) holds rows g, g+8 (+ row tiles, blocks) in registers and repeats them on the 4
    # lanes t of a quad; LC moves the g+8 rows to lane bit t0 (so two lanes share each value, and the move to
    # LA is warp shuffles: converting both t bits goes through shared memory).
    a_regs = [[0, (16 * wn) << i] for i in range(_lg(rt))] + [[kw << i, 0] for i in range(_lg(nb))]
    lc = gl.DistributedLinearLayout(
        reg_bases=a_regs, lane_bases=[[0, 8], [0, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 16 << i] for i in range(_lg(wn))] + [[1 << i, 0] for i in range(_lg(kw))],
        block_bases=[], shape=[nb * kw, bn])
    return dict(MMA=mma, LA_OP=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                LB_OP=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2), LW=lw, LX=lx, LC=lc)


@gluon.jit
def _lane_code(code_ptr, BF16: gl.constexpr):
    """This lane's code[lane % 16] in both halves (the shuffle decoder's table)."""
    p = code_ptr.to(gl.int64, bitcast=True)
    if BF16:
        return gl.inline_asm_elementwise(LANE_BF16, "=r,l", [p], dtype=gl.int32, is_pure=True, pack=1)
    else:
        return gl.inline_asm_elementwise(LANE_F16, "=r,l", [p], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _codes(words, lut, NBB: gl.constexpr, BN: gl.constexpr, CT: gl.constexpr, LDS: gl.constexpr,
           LA_OP: gl.constexpr):
    """words int32 [NBB, BN, 8] -> the A operand [NBB, BN, 64] (codes in CT, K permuted per block)."""
    if LDS:
        p0, p1, p2, p3 = gl.inline_asm_elementwise(LOOKUP_LDS, "=r,=r,=r,=r,r,r", [words, lut],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                   pack=1)
    else:
        p0, p1, p2, p3 = gl.inline_asm_elementwise(LOOKUP_SHFL, "=r,=r,=r,=r,r,r", [words, lut],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                   pack=1)
    # join(a, b) adds a minor axis: [w, i, j] = (p0, p2 | p1, p3)[j][i] = p(2i + j), so flat index 4w + 2i + j
    # holds byte 2i + j of word w (joining (p0, p1), (p2, p3) swapped bytes 1 and 2: the H200's one-hot test)
    pairs = gl.reshape(gl.join(gl.join(p0, p2), gl.join(p1, p3)), [NBB, BN, 32])  # pair of byte 4 * word + i
    lo = (pairs & 0xFFFF).to(gl.uint16).to(CT, bitcast=True)
    hi = (pairs >> 16).to(gl.uint16).to(CT, bitcast=True)
    w = gl.reshape(gl.join(lo, hi), [NBB, BN, 64])  # physical order: element 2 * byte + (0: high nibble, 1: low)
    return gl.convert_layout(_logical(w, NBB, BN), LA_OP, assert_trivial=True)


@gluon.jit
def _logical(t, NBB: gl.constexpr, R: gl.constexpr):
    """[NBB, R, 64] in physical K order (e = 16 t + 4 s + 2 h + c) -> MMA order (k = 16 s + 8 h + 2 t + c)."""
    t6 = gl.reshape(t, [NBB, R, 4, 4, 2, 2])
    return gl.reshape(gl.permute(t6, (0, 1, 3, 4, 2, 5)), [NBB, R, 64])


@gluon.jit
def _block_stats(rows, b1, b2, b3, s1, s2, s3, offset_ptr, absq_ptr, code2_ptr, absmax2_ptr, KB64):
    """Per weight row (loop invariants of `_absmax`): pointers to its absmax codes, its segment's code2 table and
    absmax2 values, its first segment-local block, its segment's offset."""
    seg = (rows >= b1).to(gl.int32) + (rows >= b2).to(gl.int32) + (rows >= b3).to(gl.int32)
    row0 = gl.where(seg == 0, 0, gl.where(seg == 1, b1, gl.where(seg == 2, b2, b3)))
    a2s = gl.where(seg == 0, 0, gl.where(seg == 1, s1, gl.where(seg == 2, s2, s3)))
    off = gl.load(offset_ptr + seg)
    return absq_ptr + rows * KB64, code2_ptr + seg * 256, absmax2_ptr + a2s, (rows - row0) * KB64, off


@gluon.jit
def _absmax(stats, blk, KB64, QV: gl.constexpr, LA: gl.constexpr):
    """fp32 [NBB, BN] absmax of block blk[b] of each row (bitsandbytes' two roundings), moved to LA.

    QV > 1: the codes of QV consecutive batches are consecutive, QV-aligned bytes (one load)."""
    q_row, c2_row, a2_row, loc, off = stats
    q_ptr = q_row[None, :] + blk[:, None]
    if QV > 1:
        q_ptr = gl.max_contiguous(gl.multiple_of(q_ptr, [QV, 1]), [QV, 1])
    q = gl.load(q_ptr).to(gl.int32)
    c2 = gl.load(c2_row[None, :] + q)
    a2 = gl.load(a2_row[None, :] + ((loc[None, :] + blk[:, None]) >> 8))
    am = gl.inline_asm_elementwise(MUL_RN, "=r,r,r", [c2, a2], dtype=gl.float32, is_pure=True, pack=1)
    return gl.convert_layout(am + off[None, :], LA)


@gluon.jit
def _finish(acc_a, acc_b, bias_ptr, cols, col_ok, N_GATE, GATED: gl.constexpr, HAS_BIAS: gl.constexpr,
            OUT: gl.constexpr):
    """As triton_common.finish, on [BN, BMP] sums (rows of the weight along dim 0)."""
    if HAS_BIAS:
        acc_a += gl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(gl.float32)[:, None]
    if GATED:
        if HAS_BIAS:
            acc_b += gl.load(bias_ptr + N_GATE + cols, mask=col_ok, other=0.0).to(gl.float32)[:, None]
        g = acc_a.to(OUT).to(gl.float32)
        u = acc_b.to(OUT).to(gl.float32)
        s = (g / (1.0 + gl.exp(-g))).to(OUT).to(gl.float32)
        return (s * u).to(OUT)
    else:
        return acc_a.to(OUT)


@gluon.jit
def _cta_sum(acc, table, NB: gl.constexpr, KW: gl.constexpr, BN: gl.constexpr, BMP: gl.constexpr, LDS: gl.constexpr,
             SLOT: gl.constexpr):
    """[NB * KW, BN, BMP] per-batch sums -> [BN, BMP]: blocks in registers, then the KW warps' sums through shared
    memory (slot SLOT of the table's bytes), added in warp order."""
    s = gl.sum(gl.reshape(acc, [NB, KW, BN, BMP]), axis=0)
    LR: gl.constexpr = gl.BlockedLayout([KW, 1, 1], [1, 4, 8], [1, gl.num_warps(), 1], [2, 1, 0])
    flat = table._reinterpret(gl.float32, [(1 + SLOT) * KW * BN * BMP], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    red = flat.slice(SLOT * KW * BN * BMP, KW * BN * BMP)._reinterpret(
        gl.float32, [KW, BN, BMP], gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0]))
    red.store(s)
    gl.thread_barrier()
    return gl.sum(red.load(LR), axis=0)


_DYNAMIC = ["M", "N_OUT", "N_ROWS", "N_GATE", "K", "stride_xm", "K_SPLIT", "write_partial",
            "b1", "b2", "b3", "s1", "s2", "s3"]


@gluon.jit(do_not_specialize=_DYNAMIC)
def lut_kernel(x_ptr, out_ptr, part_ptr, bias_ptr, packed_ptr, absq_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
               M, N_OUT, N_ROWS, N_GATE, K, stride_xm, K_SPLIT, write_partial, b1, b2, b3, s1, s2, s3,
               KW: gl.constexpr, WN: gl.constexpr, RT: gl.constexpr, NB: gl.constexpr, BMP: gl.constexpr,
               GATED: gl.constexpr, HAS_BIAS: gl.constexpr, LDS: gl.constexpr, QV: gl.constexpr,
               MMA: gl.constexpr, LA_OP: gl.constexpr, LB_OP: gl.constexpr, LW: gl.constexpr, LX: gl.constexpr,
               LC: gl.constexpr):
    """Grid (cdiv(N_OUT, BN), SPLIT); x [M <= BMP, K] bf16/fp16. Gated: column n reads rows n and N_GATE + n.

    K is tiled exactly (K_SPLIT * SPLIT = K, K_SPLIT a multiple of 64 * NB * KW): chunk pid_k is blocks
    [pid_k * K_SPLIT / 64, +K_SPLIT / 64), warp kw of a program takes the kw-th of its KW equal parts.
    """
    BN: gl.constexpr = 16 * WN * RT
    NBB: gl.constexpr = NB * KW
    CT: gl.constexpr = x_ptr.dtype.element_ty
    LA: gl.constexpr = gl.SliceLayout(2, MMA)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    KB64 = K // 64
    KBW = K_SPLIT // (64 * KW)  # blocks per warp chunk (a multiple of NB)
    kb0 = pid_k * (K_SPLIT // 64)
    n_it = KBW // NB
    # weight words [NBB, BN, 8]; block of batch b at step it: kb0 + (b % KW) * KBW + it * NB + b // KW (K is
    # tiled exactly: every block exists). Rows past N_OUT read row N_OUT - 1 (never stored).
    bw = gl.arange(0, NBB, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))
    nw = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW))), N_OUT - 1)
    cw = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
    blk_w = kb0 + (bw % KW) * KBW + bw // KW
    wp_a = (packed_ptr.to(gl.pointer_type(gl.int32)) + nw[None, :, None].to(gl.int64) * (KB64 * 8)
            + blk_w[:, None, None] * 8 + cw[None, None, :])
    wp_b = wp_a + N_GATE.to(gl.int64) * (KB64 * 8)
    words_a = gl.load(wp_a)  # the first step's bytes are on their way while the table is written
    words_b = words_a
    if GATED:
        words_b = gl.load(wp_b)
    if LDS:
        # the pair table: 256 rows (byte values) of 32 lane copies, at offset 0 (the CTA's only allocation),
        # computed from the 16 codes (L1 hits); the barrier publishes it, the lane offset is read after it
        table = gl.allocate_shared_memory(gl.int32, [256, 64], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        LT: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [gl.num_warps(), 1], [1, 0])
        e = gl.arange(0, 256, layout=gl.SliceLayout(1, LT))
        hi = gl.load(code_ptr + (e >> 4)).to(CT).to(gl.uint16, bitcast=True).to(gl.int32)
        lo = gl.load(code_ptr + (e & 15)).to(CT).to(gl.uint16, bitcast=True).to(gl.int32)
        table.slice(0, 32, dim=1).store(gl.zeros([256, 32], gl.int32, LT) + (hi | (lo << 16))[:, None])
        gl.thread_barrier()
        lut = gl.inline_asm_elementwise(LANE_OFFSET, "=r,r", [pid_n], dtype=gl.int32, is_pure=False, pack=1)
    else:
        table = gl.allocate_shared_memory(gl.float32, [(1 + GATED) * KW * BN * BMP],
                                          gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        lut = _lane_code(code_ptr, CT == gl.bfloat16)
    # x [NBB, BMP, 64]; rows past M read row M - 1 (their sums are never stored)
    bx = gl.arange(0, NBB, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
    mx = gl.minimum(gl.arange(0, BMP, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX))), M - 1)
    kx = gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
    blk_x = kb0 + (bx % KW) * KBW + bx // KW
    xptr = x_ptr + mx[None, :, None] * stride_xm + blk_x[:, None, None] * 64 + kx[None, None, :]
    # block absmax [NBB, BN], computed in LC
    bc = gl.arange(0, NBB, layout=gl.SliceLayout(1, LC))
    blk_c = kb0 + (bc % KW) * KBW + bc // KW
    nc = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, LC)), N_OUT - 1)
    qa = _block_stats(nc, b1, b2, b3, s1, s2, s3, offset_ptr, absq_ptr, code2_ptr, absmax2_ptr, KB64)
    qb = _block_stats(nc + N_GATE, b1, b2, b3, s1, s2, s3, offset_ptr, absq_ptr, code2_ptr, absmax2_ptr, KB64)

    zero = gl.zeros([NBB, BN, BMP], gl.float32, MMA)
    acc_a = zero  # per batch (block of the step, warp): one FMA per partial sum, batches added after the loop
    acc_b = zero
    for it in range(n_it):
        step = gl.minimum(it + 1, n_it - 1) * (NB * 8)  # the last step re-reads itself: never past the tensor
        next_a = gl.load(wp_a + step)
        next_b = next_a
        if GATED:
            next_b = gl.load(wp_b + step)
        xv = gl.load(xptr + it * (NB * 64))
        xb = gl.convert_layout(gl.permute(_logical(xv, NBB, BMP), (0, 2, 1)), LB_OP, assert_trivial=True)
        blk = blk_c + it * NB
        wa = _codes(words_a, lut, NBB, BN, CT, LDS, LA_OP)
        part = mma_v2(wa, xb, zero)
        acc_a += part * _absmax(qa, blk, KB64, QV, LA)[:, :, None]
        if GATED:
            wb = _codes(words_b, lut, NBB, BN, CT, LDS, LA_OP)
            part_b = mma_v2(wb, xb, zero)
            acc_b += part_b * _absmax(qb, blk, KB64, QV, LA)[:, :, None]
        words_a = next_a
        words_b = next_b

    # the sums of a CTA's warps meet in the table's memory (a real use of the allocation, which is then the only
    # one, so it sits at offset 0 where the table code addresses it), once every warp is done with the table
    gl.thread_barrier()
    sum_a = _cta_sum(acc_a, table, NB, KW, BN, BMP, LDS, 0)
    sum_b = sum_a
    if GATED:
        sum_b = _cta_sum(acc_b, table, NB, KW, BN, BMP, LDS, 1)
    LS: gl.constexpr = sum_a.type.layout
    cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LS))
    ms = gl.arange(0, BMP, layout=gl.SliceLayout(0, LS))
    col_ok = cols < N_OUT
    mask = col_ok[:, None] & (ms < M)[None, :]
    if write_partial != 0:
        base = part_ptr + pid_k.to(gl.int64) * M * N_ROWS + ms[None, :] * N_ROWS + cols[:, None]
        gl.store(base, sum_a, mask=mask)
        if GATED:
            gl.store(base + N_GATE, sum_b, mask=mask)
    else:
        y = _finish(sum_a, sum_b, bias_ptr, cols, col_ok, N_GATE, GATED, HAS_BIAS, out_ptr.dtype.element_ty)
        gl.store(out_ptr + ms[None, :] * N_OUT + cols[:, None], y, mask=mask)


_TABLES: dict = {}


def pair_table(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [256, 32]: the table each LDS program writes to shared memory (row e, a weight byte, holds
    (code[e >> 4], code[e & 15]) rounded to dtype, round to nearest even, in its low / high half, once per lane),
    as torch computes it: the reference of the decoder tests. Cached per code tensor and dtype."""
    key = (code.data_ptr(), code.device, dtype)
    table = _TABLES.get(key)
    if table is None:
        bits = code.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        e = torch.arange(256, device=code.device)
        pairs = bits[e >> 4] | (bits[e & 15] << 16)
        table = _TABLES[key] = pairs[:, None].expand(256, 32).contiguous()
    return table
