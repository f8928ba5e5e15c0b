"""NF4 Triton kernels on the GPU: dequantization bit-identical to bitsandbytes, every kernel against the twin on
real shapes (Llama-3.1-8B, SmolLM2-135M), exact weight values inside the matmuls, determinism, graph replay.

Configs are passed through `kernel_config.fit` for the call's dtype and shape, as `ops` does (fp32 shrinks tiles to
fit shared memory; the LUT kernel adapts its K steps to K). The LUT kernel (bf16/fp16) rounds the code, not the
weight: it is held to its factored twin (`reference.linear_factored`) closely and to the twin within the bound
derived in tests/nf4/test_lut.py."""
from __future__ import annotations

import copy

import pytest
import torch

from loraplex.server.nf4 import ops, reference
from loraplex.server.nf4.format import NF4Weight
from loraplex.server.nf4.kernel_config import KernelConfig, fit, smem_bytes

pytestmark = pytest.mark.gpu

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Relative error ||y - ref|| / ||ref|| allowed per compute dtype against the twin evaluated in fp32 on the very
# same dequantized weights: only the summation order (and the final rounding) differ.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
LLAMA_8B = {"qkv": ((4096, 1024, 1024), 4096), "o": ((4096,), 4096), "gate_up": ((14336, 14336), 4096),
            "down": ((4096,), 14336)}
SMOL = {"qkv": ((576, 192, 192), 576), "gate_up": ((1536, 1536), 576), "down": ((576,), 1536)}
CONFIGS = {
    "gemv": KernelConfig("gemv", block_m=2, block_n=16, block_k=512, num_warps=4, num_stages=2),
    "gemv-split4": KernelConfig("gemv", block_m=1, block_n=32, block_k=256, split_k=4, num_warps=8, num_stages=2),
    "swap": KernelConfig("gemm", block_m=16, block_n=128, block_k=128, swap_ab=True),
    "swap-split8": KernelConfig("gemm", block_m=16, block_n=128, block_k=128, swap_ab=True, split_k=8),
    "swap-tableload-split2": KernelConfig("gemm", block_m=16, block_n=128, block_k=128, swap_ab=True, split_k=2,
                                          decode_asm=False),
    "swap-bm64-split2": KernelConfig("gemm", block_m=64, block_n=64, block_k=256, swap_ab=True, split_k=2),
    "gemm-128": KernelConfig("gemm", block_m=128, block_n=128, block_k=128, num_warps=8),
    "gemm-32-split2": KernelConfig("gemm", block_m=32, block_n=128, block_k=128, split_k=2),
    "dequant_mm": KernelConfig("dequant_mm"),
}
LUT_CONFIGS = {
    "lut-kw8": KernelConfig("lut", block_m=8, block_n=16, block_k=256, num_warps=8, k_warps=8),
    "lut-kw8-nb2-split2": KernelConfig("lut", block_m=8, block_n=16, block_k=128, split_k=2, num_warps=8, k_warps=8),
    "lut-kw2-split4": KernelConfig("lut", block_m=16, block_n=64, block_k=256, split_k=4, num_warps=8, k_warps=2,
                                   max_regs=128),
    "lut-kw4-shfl": KernelConfig("lut", block_m=8, block_n=32, block_k=256, num_warps=8, k_warps=4, lut="shfl"),
    "lut-m32": KernelConfig("lut", block_m=32, block_n=16, block_k=128, num_warps=8, k_warps=8),
    "lut-m64": KernelConfig("lut", block_m=64, block_n=64, block_k=64, num_warps=8, k_warps=2, max_regs=128),
}


@pytest.fixture(scope="module")
def tk():
    from loraplex.server.nf4 import triton_kernels

    return triton_kernels


def make_weight(segments, k, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return NF4Weight.quantize([torch.randn(n, k, device="cuda", generator=gen, dtype=torch.float32).to(dtype)
                               * (0.01 + 0.05 * torch.rand(n, 1, device="cuda", generator=gen, dtype=dtype))
                               for n in segments])


def rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def run(tk, x, w, bias, gated, cfg, **kw):
    """tk.matmul with cfg fitted to this dtype and shape, as ops.linear would run it."""
    n_out = w.out_features // 2 if gated else w.out_features
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fitted = fit(cfg, x.shape[0], n_out, w.in_features, x.element_size(), gated, sms)
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    assert smem_bytes(fitted, x.element_size(), gated) <= limit
    return tk.matmul(x, w, bias, gated, fitted, **kw)


def twin_fp32(x, w, bias=None, gated=False):
    """The twin on the weights dequantized in x's dtype, evaluated in fp32 without intermediate roundings."""
    y = x.float() @ reference.dequantize(w, x.dtype).float().t()
    if bias is not None:
        y = y + bias.float()
    if gated:
        gate, up = y.split(w.out_features // 2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y


@pytest.mark.parametrize("name, shape", list(LLAMA_8B.items()) + [(f"smol_{k}", v) for k, v in SMOL.items()])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_bit_identical_to_bitsandbytes(tk, name, shape, dtype):
    import bitsandbytes.functional as bnbf

    segments, k = shape
    w = make_weight(segments, k, dtype, seed=len(name))
    for out_dtype in DTYPES:
        out = torch.full(w.shape, float("nan"), dtype=out_dtype, device="cuda")
        tk.dequantize(w, out_dtype, out=out)
        for s, n in enumerate(segments):
            qs = copy.copy(w.segment_quant_state(s))
            qs.dtype = out_dtype
            ref = bnbf.dequantize_4bit(w.segment_packed(s), qs)
            r0 = w.row_starts[s]
            assert torch.equal(out[r0:r0 + n], ref), (name, dtype, out_dtype, s)
        assert torch.equal(out, reference.dequantize(w, out_dtype))
    assert torch.equal(ops.dequantize(w), reference.dequantize(w))


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_reads_bitsandbytes_values_exactly(tk, cfg_name, dtype):
    """One-hot rows x[i] = 2^p e_k: y[i] = 2^p W[:, k] exactly, whatever the summation order."""
    w = make_weight(*SMOL["qkv"], dtype=dtype, seed=1)
    m, k = 7, w.in_features
    gen = torch.Generator(device="cuda").manual_seed(2)
    cols = torch.randint(0, k, (m,), device="cuda", generator=gen)
    scale = 2.0 ** torch.randint(-2, 3, (m,), device="cuda", generator=gen).float()
    x = torch.zeros(m, k, device="cuda", dtype=dtype)
    x[torch.arange(m, device="cuda"), cols] = scale.to(dtype)
    out = torch.full((m, w.out_features), float("nan"), dtype=dtype, device="cuda")
    ws = torch.full((8 * m * w.out_features,), float("nan"), device="cuda")
    run(tk, x, w, None, False, CONFIGS[cfg_name], out=out, workspace=ws)
    dense = reference.dequantize(w, dtype)
    assert torch.equal(out, (dense[:, cols].t().float() * scale[:, None]).to(dtype))


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("shape_name", ["qkv", "gate_up", "down", "smol_qkv", "smol_down"])
@pytest.mark.parametrize("m", [1, 3, 16, 128])
def test_matmul_against_twin(tk, cfg_name, shape_name, m):
    segments, k = LLAMA_8B[shape_name] if shape_name in LLAMA_8B else SMOL[shape_name.removeprefix("smol_")]
    w = make_weight(segments, k, seed=3)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.full((m, w.out_features), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = run(tk, x, w, None, False, CONFIGS[cfg_name], out=out)
    assert rel_err(y, twin_fp32(x, w)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("cfg_name", ["gemv", "swap-split8", "swap-tableload-split2", "gemm-128", "dequant_mm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_epilogue_and_bias(tk, cfg_name, dtype):
    w = make_weight(*SMOL["gate_up"], dtype=dtype, seed=4)
    x = torch.randn(5, w.in_features, device="cuda", dtype=dtype)
    bias = torch.randn(w.out_features, device="cuda", dtype=dtype)
    y = run(tk, x, w, bias, True, CONFIGS[cfg_name])
    assert y.shape == (5, w.out_features // 2) and y.dtype == dtype
    # gate and up are rounded to dtype before silu and the product: a few roundings more than the fp32 twin
    assert rel_err(y, twin_fp32(x, w, bias, gated=True)) <= 3 * TOLERANCE[dtype]
    yb = run(tk, x, w, bias, False, CONFIGS[cfg_name])
    assert rel_err(yb, twin_fp32(x, w, bias)) <= TOLERANCE[dtype]


def test_fp32_models_use_ieee_products(tk):
    """fp32 x: tl.dot with input_precision="ieee" (no tf32), so fp32 models keep PEFT parity."""
    w = make_weight(*LLAMA_8B["o"], dtype=torch.float32, seed=5)
    x = torch.randn(32, w.in_features, device="cuda")
    truth = x.double() @ reference.dequantize(w, torch.float32).double().t()
    for name in ("gemm-128", "swap", "gemv"):
        assert rel_err(run(tk, x[:4] if name == "gemv" else x, w, None, False, CONFIGS[name]),
                       truth[:4] if name == "gemv" else truth) <= 1e-5, name  # tf32 would be ~1e-3


@pytest.mark.parametrize("m", [1, 2, 8, 32, 128, 300])
def test_ops_dispatch_and_determinism(m):
    w = make_weight(*LLAMA_8B["qkv"], seed=6)
    g = make_weight(*LLAMA_8B["gate_up"], seed=7)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    y1, y2 = ops.linear(x, w), ops.linear(x, w)
    assert torch.equal(y1, y2)
    assert rel_err(y1, twin_fp32(x, w)) <= TOLERANCE[torch.bfloat16]
    z1, z2 = ops.linear_gate_up_silu(x, g), ops.linear_gate_up_silu(x, g)
    assert torch.equal(z1, z2)
    assert rel_err(z1, twin_fp32(x, g, gated=True)) <= 3 * TOLERANCE[torch.bfloat16]
    x3 = x.view(1, m, 4096)
    assert torch.equal(ops.linear(x3, w).view(m, -1), y1)


@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_cuda_graph_replay_equals_eager(m):
    w = make_weight(*LLAMA_8B["qkv"], seed=8)
    g = make_weight(*LLAMA_8B["gate_up"], seed=9)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    eager = (ops.linear(x, w), ops.linear_gate_up_silu(x, g))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = (ops.linear(x, w), ops.linear_gate_up_silu(x, g))
    for out in captured:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
    x.copy_(torch.randn_like(x))  # new inputs, same graph
    graph.replay()
    assert torch.equal(captured[0], ops.linear(x, w))


# ------------------------------------------------------------------------------------------ LUT kernel
def lut_bound(x, w, gated=False):
    """|kernel - factored twin| for 2-byte outputs: one output rounding (half an ulp of the result, 2^-8 / 2^-11
    relative) plus fp32 sums (tensor-core accumulation, block order: K 2^-22 of sum |x||W|)."""
    dense = reference.dequantize(w, torch.float32).abs()
    mag = x.float().abs() @ dense.t()
    half_ulp = 2.0 ** -8 if x.dtype == torch.bfloat16 else 2.0 ** -11
    return half_ulp, w.in_features * 2.0 ** -22 * mag


LUT_CASES = [(name, shape, torch.bfloat16) for name in LUT_CONFIGS for shape in ("qkv", "smol_down")] + [
    ("lut-kw8", "down", torch.float16), ("lut-kw2-split4", "smol_qkv", torch.float16)]


@pytest.mark.parametrize("cfg_name, shape_name, dtype", LUT_CASES)
def test_lut_matches_its_factored_twin_and_the_twin(tk, cfg_name, shape_name, dtype):
    """(Each distinct config x dtype x fitted K step compiles for seconds: the cases are few on purpose.)"""
    segments, k = LLAMA_8B[shape_name] if shape_name in LLAMA_8B else SMOL[shape_name.removeprefix("smol_")]
    w = make_weight(segments, k, dtype, seed=11)
    cfg = LUT_CONFIGS[cfg_name]
    for m in sorted({1, 3, cfg.block_m}):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = torch.full((m, w.out_features), float("nan"), dtype=dtype, device="cuda")
        ws = torch.full((8 * m * w.out_features,), float("nan"), device="cuda")
        y = run(tk, x, w, None, False, cfg, out=out, workspace=ws).float()
        fac = reference.linear_factored(x, w)
        half_ulp, sums = lut_bound(x, w)
        assert ((y - fac).abs() <= half_ulp * fac.abs() + sums).all(), (m, float((y - fac).abs().max()))
        assert rel_err(y, twin_fp32(x, w)) <= (5e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("cfg_name, dtype", [("lut-kw8", torch.bfloat16), ("lut-kw2-split4", torch.bfloat16),
                                             ("lut-kw4-shfl", torch.bfloat16), ("lut-m32", torch.bfloat16),
                                             ("lut-m64", torch.bfloat16), ("lut-kw8", torch.float16)])
def test_lut_gated_and_bias(tk, cfg_name, dtype):
    for segments, k in (LLAMA_8B["gate_up"], SMOL["gate_up"]):
        w = make_weight(segments, k, dtype, seed=12)
        x = torch.randn(5, k, device="cuda", dtype=dtype)
        bias = torch.randn(w.out_features, device="cuda", dtype=dtype)
        y = run(tk, x, w, bias, True, LUT_CONFIGS[cfg_name])
        assert y.shape == (5, w.out_features // 2) and y.dtype == dtype
        assert rel_err(y, twin_fp32(x, w, bias, gated=True)) <= 3 * (5e-3 if dtype == torch.bfloat16 else 1e-3)
        yb = run(tk, x, w, bias, False, LUT_CONFIGS[cfg_name])
        assert rel_err(yb, twin_fp32(x, w, bias)) <= (5e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("cfg_name", list(LUT_CONFIGS))
def test_lut_one_hot_is_code_times_absmax(tk, cfg_name):
    """x[i] = 2^p e_k: y[i, n] = OUT(2^p * fp32(OUT(code[nibble(n, k)]) * absmax(n, k)) exactly (every other product
    and block is zero), so the decoder reads each byte's pair from the right place for every lane."""
    dtype = torch.bfloat16
    w = make_weight(*SMOL["qkv"], dtype=dtype, seed=1)
    cfg = LUT_CONFIGS[cfg_name]
    m, k = min(cfg.block_m, 7), w.in_features
    gen = torch.Generator(device="cuda").manual_seed(2)
    cols = torch.randint(0, k, (m,), device="cuda", generator=gen)
    scale = 2.0 ** torch.randint(-2, 3, (m,), device="cuda", generator=gen).float()
    x = torch.zeros(m, k, device="cuda", dtype=dtype)
    x[torch.arange(m, device="cuda"), cols] = scale.to(dtype)
    y = run(tk, x, w, None, False, cfg)
    codes = reference.linear_factored(torch.eye(k, device="cuda", dtype=dtype)[cols], w)  # fp32(code * absmax)
    assert torch.equal(y, (codes * scale[:, None]).to(dtype))


def test_fp32_decode_shapes_fit(tk):
    """The first H200 run: fp32 configs tuned for bf16 overflowed shared memory. ops now fits them."""
    for name in ("qkv", "gate_up", "down"):
        w = make_weight(*LLAMA_8B[name], dtype=torch.float32, seed=13)
        for m in (1, 16, 64, 128):
            x = torch.randn(m, w.in_features, device="cuda")
            truth = x.double() @ reference.dequantize(w, torch.float32).double().t()
            assert rel_err(ops.linear(x, w), truth) <= 1e-5
            if name == "gate_up":
                ops.linear_gate_up_silu(x, w)
