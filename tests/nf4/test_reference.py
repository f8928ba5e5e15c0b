"""The NF4 twin (CPU): bit-identical to bitsandbytes' dequantize_4bit, fused segments equal separate ones,
the bnb views round-trip, and the ops seam routes CPU tensors to the twin."""
from __future__ import annotations

import copy
import json

import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F

from loraplex.server.nf4 import ops, reference
from loraplex.server.nf4.format import NF4Weight
from loraplex.server.nf4.kernel_config import M_BUCKETS, KernelConfig, default_config, m_bucket
from loraplex.server.nf4.tuning import candidates

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMOL_SHAPES = [(192, 576), (576, 576), (1536, 576), (576, 1536)]  # SmolLM2-135M: k/v, q/o, gate/up, down
ODD_SHAPES = [(3, 100), (5, 66)]  # blocks straddle rows, a partial last block


def quantize(w: torch.Tensor):
    return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)


def bnb_dequant(packed, qs, dtype):
    qs = copy.copy(qs)
    qs.dtype = dtype  # bitsandbytes dequantizes into quant_state.dtype
    return bnbf.dequantize_4bit(packed, qs)


def weight(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * (0.02 + torch.rand(shape[0], 1, generator=gen))).to(dtype)


@pytest.mark.parametrize("shape", SMOL_SHAPES + ODD_SHAPES)
@pytest.mark.parametrize("src_dtype", DTYPES)
def test_twin_dequantize_is_bitsandbytes(shape, src_dtype):
    packed, qs = quantize(weight(shape, src_dtype, seed=sum(shape)))
    w = NF4Weight.from_bnb([(packed, qs)])
    assert w.shape == shape and w.dtype == src_dtype
    for out_dtype in DTYPES:
        ours = reference.dequantize(w, out_dtype)
        ref = bnb_dequant(packed, qs, out_dtype)
        assert ours.dtype == ref.dtype == out_dtype and ours.shape == ref.shape == shape
        assert torch.equal(ours, ref), (shape, src_dtype, out_dtype)
    assert reference.dequantize(w).dtype == src_dtype


def test_twin_absmax_two_roundings():
    """absmax = fp32(fp32(code2[q] * absmax2) + offset), not one fused rounding: equal to bitsandbytes' own."""
    packed, qs = quantize(weight((576, 1536), torch.float32, seed=3))
    w = NF4Weight.from_bnb([(packed, qs)])
    ref = bnbf.dequantize_blockwise(qs.absmax, qs.state2)
    ref += qs.offset
    assert torch.equal(reference.absmax(w), ref)
    fused = (qs.state2.code[qs.absmax.long()].double()
             * qs.state2.absmax.repeat_interleave(256)[:qs.absmax.numel()].double() + qs.offset.double()).float()
    assert not torch.equal(fused, ref)  # the check above can tell one rounding from two


@pytest.mark.parametrize("segments, k", [((576, 192, 192), 576), ((1536, 1536), 576), ((64, 32, 96), 128),
                                         ((3, 5), 64)])
def test_fused_segments_equal_separate(segments, k):
    weights = [weight((n, k), torch.bfloat16, seed=i + n) for i, n in enumerate(segments)]
    fused = NF4Weight.quantize(weights)
    assert fused.shape == (sum(segments), k) and fused.num_segments == len(segments)
    dense = reference.dequantize(fused, torch.float32)
    for s, (n, wt) in enumerate(zip(segments, weights)):
        packed, qs = quantize(wt)
        r0 = fused.row_starts[s]
        assert torch.equal(dense[r0:r0 + n], bnb_dequant(packed, qs, torch.float32))
        mine_p, mine = fused.segment_packed(s), fused.segment_quant_state(s)
        assert mine_p.shape == packed.shape and torch.equal(mine_p, packed)
        assert tuple(mine.shape) == tuple(qs.shape) and mine.blocksize == 64 and mine.nested
        for a, b in ((mine.absmax, qs.absmax), (mine.code, qs.code), (mine.offset, qs.offset),
                     (mine.state2.absmax, qs.state2.absmax), (mine.state2.code, qs.state2.code)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        # bitsandbytes itself reads our views back to the same weight
        assert torch.equal(bnbf.dequantize_4bit(mine_p, mine), bnbf.dequantize_4bit(packed, qs))


def test_from_bnb_rejects_what_kernels_cannot_read():
    packed, qs = bnbf.quantize_4bit(weight((8, 64), torch.float32, 0), blocksize=64, compress_statistics=False,
                                    quant_type="nf4")
    with pytest.raises(ValueError, match="double-quantized"):
        NF4Weight.from_bnb([(packed, qs)])
    with pytest.raises(ValueError, match="in_features"):
        NF4Weight.from_bnb([quantize(weight((8, 64), torch.float32, 1)), quantize(weight((8, 128), torch.float32, 2))])
    fp4 = bnbf.quantize_4bit(weight((8, 64), torch.float32, 3), blocksize=64, compress_statistics=True,
                             quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4Weight.from_bnb([fp4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_twin_linear_and_gate_up(dtype):
    gen = torch.Generator().manual_seed(5)
    gate, up = weight((96, 128), dtype, 11), weight((96, 128), dtype, 12)
    w = NF4Weight.quantize([gate, up])
    x = torch.randn(5, 3, 128, generator=gen).to(dtype)
    bias = torch.randn(192, generator=gen).to(dtype)
    dense = reference.dequantize(w, dtype)
    assert torch.equal(reference.linear(x, w, bias), F.linear(x, dense, bias))
    g_sep = F.linear(x, dense[:96])
    u_sep = F.linear(x, dense[96:])
    y = reference.linear_gate_up_silu(x, w)
    assert y.shape == (5, 3, 96) and y.dtype == dtype
    torch.testing.assert_close(y, F.silu(g_sep) * u_sep, rtol=0 if dtype == torch.float32 else 1e-2,
                               atol=1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="two equal segments"):
        reference.linear_gate_up_silu(x, NF4Weight.quantize([gate]))


def test_ops_on_cpu_are_the_twin():
    w = NF4Weight.quantize([weight((64, 128), torch.float32, 7), weight((32, 128), torch.float32, 8)])
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ops.linear(x, w), reference.linear(x, w))
    assert torch.equal(ops.dequantize(w, torch.bfloat16), reference.dequantize(w, torch.bfloat16))
    assert ops.dequantize(w).dtype == torch.float32


def test_nf4weight_validates_and_moves():
    w = NF4Weight.quantize(weight((64, 128), torch.float32, 9))
    assert w.kernel_ok and w.nbytes == 64 * 128 // 2 + 128 + 4 + 256 * 4 + 4 + 16 * 4
    assert not NF4Weight.quantize(weight((3, 100), torch.float32, 9)).kernel_ok
    with pytest.raises(ValueError, match="packed"):
        NF4Weight(**{**w.tensors(), "packed": w.packed[:-1]}, in_features=128, segment_rows=(64,),
                  dtype=torch.float32)
    assert w.to("cpu") is w


def test_kernel_configs():
    assert [m_bucket(m) for m in (1, 3, 16, 17, 128, 129)] == [1, 4, 16, 32, 128, None]
    assert default_config(200, 4096, 4096, 132).kernel == "dequant_mm"
    for m in (1, 5, 33, 64):  # bf16/fp16 decode: the LUT kernel, K tiled exactly, M within its tile
        cfg = default_config(m, 6144, 4096, 132)
        assert cfg.kernel == "lut" and cfg.block_m >= m and 4096 % (cfg.block_k * cfg.k_warps * cfg.split_k) == 0
    assert default_config(128, 6144, 4096, 132).kernel == "gemm"
    for m in (1, 5, 33, 128):  # fp32: the tl.dot kernels
        cfg = default_config(m, 6144, 4096, 132, elem_bytes=4)
        assert cfg.kernel == "gemm" and cfg.block_m >= 16 and 4096 % cfg.block_k == 0
    small = default_config(1, 4096, 14336, 132, elem_bytes=4)
    assert small.split_k > 1  # 32 column tiles cannot fill 132 SMs without splitting K
    smol = default_config(1, 960, 576, 132)  # K = 9 blocks: one block a step, no K warps
    assert smol.kernel == "lut" and smol.block_k == 64 and smol.k_warps == 1
    for bucket in M_BUCKETS:
        cands = candidates(bucket, 6144, 4096, 132)
        assert cands and len(set(cands)) == len(cands)
    with pytest.raises(ValueError, match="block_k"):
        KernelConfig(block_k=96)
    with pytest.raises(ValueError, match="gemm tiles"):
        KernelConfig(kernel="gemm", block_m=8)
    with pytest.raises(ValueError, match="lut"):
        KernelConfig(kernel="lut", block_m=8, block_n=16, num_warps=8, k_warps=4)  # 2 row warps need 32 rows


SHAPES_8B = [(6144, 4096, False), (4096, 4096, False), (1024, 4096, False), (28672, 4096, False),
             (28672, 4096, True), (14336, 4096, False), (4096, 14336, False)]
SHAPES_SMOL = [(960, 576, False), (576, 576, False), (192, 576, False), (3072, 576, False), (3072, 576, True),
               (576, 1536, False)]


@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_every_chosen_config_fits_shared_memory(elem_bytes):
    """For every 8B / SmolLM2 shape, M in 1..256 and dtype (2 bytes: bf16/fp16, 4: fp32), the heuristic's config,
    the tuner's candidates and the committed table's entries (as looked up: fitted) stay within an H100/H200
    block's shared memory by `smem_bytes`, and are valid for the call (LUT: 2-byte x, M in tile, K tiled)."""
    from loraplex.server.nf4 import tuning
    from loraplex.server.nf4.kernel_config import SMEM_LIMIT, fit, smem_bytes

    table = json.loads(tuning.config_path("NVIDIA H200").read_text())["configs"]
    for n_rows, k, gated in SHAPES_8B + SHAPES_SMOL:
        n_out = n_rows // 2 if gated else n_rows
        op = "gate_up_silu" if gated else "linear"
        for m in range(1, 257):
            bucket = m_bucket(m)
            chosen = [default_config(m, n_out, k, 132, elem_bytes, gated)]
            entry = table.get(op, {}).get(f"{n_rows}x{k}", {}).get(str(bucket)) if bucket else None
            if entry:
                chosen.append(fit(KernelConfig(**entry), m, n_out, k, elem_bytes, gated, 132))
            if bucket and m == bucket:
                chosen += candidates(bucket, n_out, k, 132, elem_bytes, gated)
            for cfg in chosen:
                assert smem_bytes(cfg, elem_bytes, gated) <= SMEM_LIMIT, (n_rows, k, m, cfg)
                if cfg.kernel == "lut":
                    assert elem_bytes == 2 and m <= cfg.block_m
                    assert k % (cfg.block_k * cfg.k_warps * cfg.split_k) == 0


# Triton 3.6 sm_90 compiles (dynamic shared memory, bytes) the estimate must cover; the configs that failed on
# the first H200 run are among them (fp32, 272384 / 233472 / 348160 bytes against a 232448 limit).
MEASURED_SMEM = [  # (kernel, bm, bn, bk, swap, warps, stages, asm, elem_bytes, gated, bytes)
    ("gemm", 16, 128, 128, True, 4, 3, True, 2, False, 65536),
    ("gemm", 16, 128, 128, True, 4, 3, True, 4, True, 233472),
    ("gemm", 16, 64, 256, True, 4, 3, True, 4, True, 249856),
    ("gemm", 64, 64, 256, True, 4, 3, True, 4, False, 272384),
    ("gemm", 128, 128, 128, False, 8, 3, True, 4, True, 348160),
    ("gemm", 16, 128, 128, True, 4, 3, False, 2, True, 159744),
    ("gemm", 16, 128, 128, True, 4, 2, True, 4, False, 149504),
    ("gemm", 16, 128, 256, True, 8, 3, True, 4, False, 315392),
]


@pytest.mark.parametrize("case", MEASURED_SMEM)
def test_smem_estimate_covers_sm90_compiles(case):
    from loraplex.server.nf4.kernel_config import smem_bytes

    kind, bm, bn, bk, swap, warps, stages, asm, elem_bytes, gated, measured = case
    cfg = KernelConfig(kind, block_m=bm, block_n=bn, block_k=bk, swap_ab=swap, num_warps=warps, num_stages=stages,
                       decode_asm=asm)
    assert measured <= smem_bytes(cfg, elem_bytes, gated) <= 1.7 * measured


def test_tuned_table_lookup(monkeypatch):
    from loraplex.server.nf4 import tuning

    class Props:
        name, multi_processor_count = "NVIDIA H200", 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    tuned = KernelConfig("gemv", block_m=2, block_n=32, block_k=256, split_k=4, num_warps=8, num_stages=2)
    lut = KernelConfig("lut", block_m=8, block_n=16, block_k=256, split_k=2, num_warps=8, k_warps=8)
    tuning.use_table({"linear": {"6144x4096": {"2": tuned.to_dict(), "8": lut.to_dict()}}})
    try:
        dev = torch.device("cuda", 0)
        assert tuning.lookup("linear", 6144, 4096, 2, dev) == tuned
        assert tuning.lookup("linear", 6144, 4096, 1, dev) == default_config(1, 6144, 4096, 132)  # no entry
        assert tuning.lookup("gate_up_silu", 6144, 4096, 2, dev) == default_config(2, 3072, 4096, 132, gated=True)
        assert tuning.lookup("linear", 6144, 4096, 129, dev).kernel == "dequant_mm"
        assert tuning.lookup("linear", 6144, 4096, 7, dev, torch.float16) == lut
        fp32 = tuning.lookup("linear", 6144, 4096, 7, dev, torch.float32)  # the LUT kernel takes 2-byte x only
        assert fp32.kernel == "gemm" and fp32 == default_config(7, 6144, 4096, 132, elem_bytes=4)
    finally:
        tuning.use_table(None)
    assert tuning.config_path("NVIDIA H200").name == "NVIDIA_H200.json"
