"""NF4 nibble decoding: value = OUT(fp32(code[nibble] * absmax)), the hot loop of every NF4 kernel.

Two implementations with identical results:
- portable (interpreter, fp32 outputs): two gathers from the 16-entry code table in global memory (L1), the
  product with `mul_rn` (on CUDA an explicit `mul.rn.f32`: Triton would otherwise flush subnormals).
- ASM (CUDA, bf16/fp16 outputs): every lane holds code[lane % 16] in a register and a nibble is looked up with one
  `shfl.sync.idx` whose segment mask makes the lane index ignore all bits above the nibble, so decoding a byte
  costs two shifts at most, two shuffles, two multiplies and one packed conversion -- no address arithmetic and
  no memory access (a gather from memory costs a 64-bit address and a load per element, and Triton's pipeliner
  turns such gathers into shared-memory copies). The multiply is `mul.rn.f32` and the conversion
  `cvt.rn.{bf16,f16}x2.f32`: the single roundings of bitsandbytes' kernel (no FTZ, no contraction).
"""
from __future__ import annotations

import triton
import triton.language as tl

# $0,$1: high-nibble values of bytes 0..3 (packed x2), $2,$3: low-nibble values; $4: the 4 bytes (byte e in bits
# 8e..8e+7); $5..$8: this lane's code[lane % 16] (one value, repeated); $9..$12: absmax of bytes 0..3.
# shfl c = 0x100F: segment mask 0x10 (two 16-lane halves), so the source lane is (lane & 16) | (b & 15).
_DECODE_PTX = """{
.reg .b32 s<7>, h<4>, l<4>;
shr.b32 s0, $4, 4;
shr.b32 s1, $4, 8;
shr.b32 s2, $4, 12;
shr.b32 s3, $4, 16;
shr.b32 s4, $4, 20;
shr.b32 s5, $4, 24;
shr.b32 s6, $4, 28;
shfl.sync.idx.b32 l0, $5, $4, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h0, $5, s0, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 l1, $5, s1, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h1, $5, s2, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 l2, $5, s3, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h2, $5, s4, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 l3, $5, s5, 0x100F, 0xFFFFFFFF;
shfl.sync.idx.b32 h3, $5, s6, 0x100F, 0xFFFFFFFF;
mul.rn.f32 h0, h0, $9;
mul.rn.f32 h1, h1, $10;
mul.rn.f32 h2, h2, $11;
mul.rn.f32 h3, h3, $12;
mul.rn.f32 l0, l0, $9;
mul.rn.f32 l1, l1, $10;
mul.rn.f32 l2, l2, $11;
mul.rn.f32 l3, l3, $12;
cvt.rn.TYPEx2.f32 $0, h1, h0;
cvt.rn.TYPEx2.f32 $1, h3, h2;
cvt.rn.TYPEx2.f32 $2, l1, l0;
cvt.rn.TYPEx2.f32 $3, l3, l2;
}"""
DECODE_PTX_BF16: tl.constexpr = tl.constexpr(_DECODE_PTX.replace("TYPE", "bf16"))
DECODE_PTX_F16: tl.constexpr = tl.constexpr(_DECODE_PTX.replace("TYPE", "f16"))
LANE_CODE_PTX: tl.constexpr = tl.constexpr(
    "{ .reg .u32 l; .reg .u64 a; mov.u32 l, %laneid; and.b32 l, l, 15; mad.wide.u32 a, l, 4, $1; "
    "ld.global.nc.f32 $0, [a]; }")


@triton.jit
def mul_rn(a, b, EXACT: tl.constexpr):
    """fp32 a * b rounded to nearest (no flush to zero), never contracted into an FMA with a following add."""
    if EXACT:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return a * b


@triton.jit
def lane_code(code_ptr, ASM: tl.constexpr):
    """This lane's code[lane % 16] (a per-lane value: only meaningful as `decode_halves`' `tab` on the same lane);
    0 when not ASM."""
    if ASM:
        return tl.inline_asm_elementwise(LANE_CODE_PTX, "=r,l", [code_ptr.to(tl.int64, bitcast=True)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 0.0


@triton.jit
def decode_halves(packed, am, code_ptr, tab, OUT_DTYPE: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr):
    """packed: uint8 [...]; am: fp32, broadcastable -> (high-nibble values, low-nibble values), [...] in OUT_DTYPE.

    Byte i of a row holds element 2i in its high nibble and 2i+1 in its low one.
    """
    if ASM:
        if OUT_DTYPE == tl.bfloat16:
            hi, lo = tl.inline_asm_elementwise(DECODE_PTX_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [packed, tab, am],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            hi, lo = tl.inline_asm_elementwise(DECODE_PTX_F16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [packed, tab, am],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        b = packed.to(tl.int32)
        hi = mul_rn(tl.load(code_ptr + (b >> 4)), am, EXACT).to(OUT_DTYPE)
        lo = mul_rn(tl.load(code_ptr + (b & 15)), am, EXACT).to(OUT_DTYPE)
    return hi, lo


@triton.jit
def decode_pairs(packed, am, code_ptr, tab, OUT_DTYPE: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr):
    """packed: uint8 [R, C, 32] (64 elements a row); am fp32 [R, C, 1] -> [R, C, 64] in OUT_DTYPE, order kept."""
    hi, lo = decode_halves(packed, am, code_ptr, tab, OUT_DTYPE, EXACT, ASM)
    w = tl.join(hi, lo)  # [R, C, 32, 2]
    return tl.reshape(w, [w.shape[0], w.shape[1], 64])
