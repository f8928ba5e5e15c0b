"""The LUT kernel's pieces on the CPU: its inline PTX run by a small warp emulator against the pair table, its
factored arithmetic (torch twin) against "dequantize, then matmul" within a derived bound, and offline sm_90
compiles of its configurations (layout moves free, the table at shared-memory offset 0, no spills, instructions
per weight element). The kernel itself runs on the GPU only (tests/nf4/test_gpu.py)."""
from __future__ import annotations

import re

import pytest
import torch

from loraplex.server.nf4 import reference
from loraplex.server.nf4.format import NF4Weight

gluon_lut = pytest.importorskip("loraplex.server.nf4.gluon_lut")


# --------------------------------------------------------------------------------------- PTX emulation
def _prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 (default mode): output byte i = byte (sel >> 4i) & 7 of {b, a}, sign-replicated if bit 3 is set."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> 4 * i) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def _run_warp(asm: str, operands: list[dict[str, int]], smem: bytes | None = None) -> list[dict[str, int]]:
    """Run the straight-line PTX `asm` on 32 lanes in lockstep. operands[lane] maps "$i" to a value; returns the
    lanes' registers. Knows the instructions the LUT kernel's asm uses (global_smem is at address 0)."""
    regs = [dict(ops) for ops in operands]
    mask = 0xFFFFFFFF
    for line in asm.replace("{", ";").replace("}", ";").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        args = [a.strip() for a in args.split(",")]

        def val(lane: int, a: str) -> int:
            if a == "global_smem":
                return 0
            if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", a):
                return int(a, 0)
            return regs[lane][a]

        if op.startswith("shfl.sync.idx"):
            d, a, b, c = args[:4]
            c = val(0, c)
            seg, clamp = (c >> 8) & 0x1F, c & 0x1F
            new = []
            for lane in range(32):
                j = (lane & seg) | (val(lane, b) & ~seg & 0x1F)
                new.append(regs[j][a] if j <= ((lane & seg) | (clamp & ~seg)) else regs[lane][a])
            for lane in range(32):
                regs[lane][d] = new[lane]
            continue
        for lane in range(32):
            r = regs[lane]
            if op == "mov.u32":
                r[args[0]] = val(lane, args[1])
            elif op in ("shr.b32", "shr.u32"):
                r[args[0]] = (val(lane, args[1]) & mask) >> val(lane, args[2])
            elif op == "shl.b32":
                r[args[0]] = (val(lane, args[1]) << val(lane, args[2])) & mask
            elif op == "add.u32":
                r[args[0]] = (val(lane, args[1]) + val(lane, args[2])) & mask
            elif op == "prmt.b32":
                r[args[0]] = _prmt(val(lane, args[1]), val(lane, args[2]), val(lane, args[3]))
            elif op == "ld.shared.b32":
                addr = val(lane, args[1].strip("[]"))
                r[args[0]] = int.from_bytes(smem[addr:addr + 4], "little")
            else:
                raise AssertionError(f"emulator does not know {op}")
    return regs


def _code16(code: torch.Tensor, dtype: torch.dtype) -> list[int]:
    return (code.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_table(dtype):
    code = NF4Weight.quantize(torch.randn(8, 64)).code
    table = gluon_lut.pair_table(code, dtype)
    assert table.shape == (256, 32) and table.dtype == torch.int32 and table.is_contiguous()
    c16 = _code16(code, dtype)
    for e in (0, 7, 0x5A, 0xF0, 255):
        assert (table[e] & 0xFFFFFFFF == c16[e >> 4] | c16[e & 15] << 16).all()  # byte i: element 2i = high nibble
    assert gluon_lut.pair_table(code, dtype) is table  # cached


def _shared_image(table: torch.Tensor) -> bytes:
    """The kernel's shared memory after its prologue: row e (a byte value) at e * 256, 32 lane copies."""
    img = bytearray(gluon_lut.LUT_BYTES)
    rows = table.numpy().astype("<u4").tobytes()
    for e in range(256):
        img[e * 256:e * 256 + 128] = rows[e * 128:(e + 1) * 128]
    return bytes(img)


@pytest.mark.parametrize("decoder", ["lds", "shfl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoder_asm_returns_the_pairs_of_each_byte(decoder, dtype):
    code = NF4Weight.quantize(torch.randn(8, 64)).code
    c16 = _code16(code, dtype)
    gen = torch.Generator().manual_seed(3)
    words = torch.randint(0, 2 ** 32, (4, 32), generator=gen, dtype=torch.int64).tolist()
    words[0][:4] = [0, 0xFFFFFFFF, 0x0123ABCD, 0x80808080]
    if decoder == "lds":
        asm, smem = str(gluon_lut.LOOKUP_LDS.value), _shared_image(gluon_lut.pair_table(code, dtype))
        tab = [4 * lane for lane in range(32)]  # LANE_OFFSET
    else:
        asm, smem = str(gluon_lut.LOOKUP_SHFL.value), None
        tab = [c16[lane % 16] * 0x10001 for lane in range(32)]  # _lane_code: the code in both halves
    for row in words:
        regs = _run_warp(asm, [{"$4": row[lane], "$5": tab[lane]} for lane in range(32)], smem)
        for lane in range(32):
            for i in range(4):
                byte = (row[lane] >> 8 * i) & 0xFF
                assert regs[lane][f"${i}"] == c16[byte >> 4] | c16[byte & 15] << 16, (decoder, lane, i, hex(byte))


def test_lane_offset_asm():
    regs = _run_warp(str(gluon_lut.LANE_OFFSET.value).replace("%laneid", "lane"),
                     [{"lane": lane} for lane in range(32)])
    assert [r["$0"] for r in regs] == [4 * lane for lane in range(32)]


def test_k_permutation_within_blocks():
    """_logical's reshape/permute, replayed in torch on element indices: MMA position k = 16 s + 8 h + 2 t + c holds
    physical element 16 t + 4 s + 2 h + c, so lane t of a quad (MMA k slots 2t, 2t+1, 2t+8, 2t+9 of each k16 step s)
    reads bytes 8t .. 8t+7 of a block row: one 8-byte load. W and x go through the same permutation."""
    physical = torch.arange(64).reshape(4, 4, 2, 2).permute(1, 2, 0, 3).reshape(64)
    k = torch.arange(64)
    s, h, t, c = k // 16, (k // 8) % 2, (k // 2) % 4, k % 2
    assert torch.equal(physical, 16 * t + 4 * s + 2 * h + c)
    assert sorted(physical.tolist()) == list(range(64))


# ------------------------------------------------------------------------------------ numerical bound
def factored_bound(x: torch.Tensor, w: NF4Weight, code_dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on |LUT kernel - twin| before the output rounding.

    Twin: W = rnd(code * absmax) (one rounding to x.dtype, unit u = 2^-8 bf16 / 2^-11 fp16 relative half-ulp
    2^-9 / 2^-12); kernel: rnd(code) * absmax, exact in fp32 per product. |W_twin - W_kernel| <= 2u' |W| with
    u' the half-ulp, so the sums differ by <= 2u' sum_k |x_k W_k|, plus fp32 summation (K 2^-24 sum |x W|) in each.
    """
    half_ulp = 2.0 ** -9 if code_dtype == torch.bfloat16 else 2.0 ** -12
    dense = reference.dequantize(w, torch.float32).abs().double()
    mag = x.double().abs() @ dense.t()
    return (2 * half_ulp * (1 + 2 * half_ulp) + 2 * w.in_features * 2.0 ** -24) * mag


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factored_twin_within_bound(dtype):
    gen = torch.Generator().manual_seed(7)
    w = NF4Weight.quantize([torch.randn(96, 512, generator=gen) * 0.02, torch.randn(32, 512, generator=gen) * 0.3])
    x = (torch.randn(9, 512, generator=gen) * 3).to(dtype)
    fac = reference.linear_factored(x, w).double()
    twin = x.double() @ reference.dequantize(w, dtype).double().t()
    bound = factored_bound(x, w, dtype)
    assert ((fac - twin).abs() <= bound).all()
    rel = float((fac - twin).norm() / twin.norm())
    assert rel < (3e-3 if dtype == torch.bfloat16 else 4e-4)  # typical: ~2e-3 / ~2.5e-4
    exact = x.double() @ reference.dequantize(w, torch.float32).double().t()
    # as close to the exact NF4 values as bitsandbytes' own rounded weights are
    assert float((fac - exact).norm()) < 1.5 * float((twin - exact).norm())


# -------------------------------------------------------------------------------- offline sm_90 builds
sass = pytest.importorskip("loraplex.server.nf4.sass")
needs_ptxas = pytest.mark.skipif(not sass.available(), reason="no sm_90 toolchain (Triton's NVIDIA backend)")


@needs_ptxas
@pytest.mark.parametrize("m, gated, max_per_elem", [(8, False, 2.4), (16, False, 2.8), (8, True, 2.4),
                                                    (16, True, 2.8)])
def test_lut_build_for_sm90(m, gated, max_per_elem):
    from loraplex.server.nf4.kernel_config import KernelConfig, lut_blocks_per_step, lut_max_regs

    nb = lut_blocks_per_step(m, gated)
    cfg = KernelConfig("lut", block_m=m, block_n=16, block_k=64 * nb, num_warps=8, k_warps=8,
                       max_regs=lut_max_regs(m, gated, 8))
    built = sass.compile_config(cfg, torch.bfloat16, gated)
    # the table is the program's only shared memory, so it sits at offset 0 where the decoder's asm reads it
    assert built.shared == gluon_lut.LUT_BYTES
    n, ops = built.loop()
    assert built.registers <= 128 and ops["STL"] == 0 and ops["LDL"] <= 4  # two 8-warp programs per SM
    per_elem = n / sass.elements_per_iteration(cfg, gated)
    assert per_elem <= max_per_elem, (per_elem, ops.most_common(10))
    assert ops["LDS"] == ops["PRMT"] == sass.elements_per_iteration(cfg, gated) // 2  # one of each per weight byte
    assert not ops["SHFL"] > 8 and not ops["BAR"]  # no layout moves through shared memory in the loop
