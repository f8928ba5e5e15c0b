"""The NF4 Triton kernels on CPU under TRITON_INTERPRET=1, against the twin (tiny shapes, seconds each).

The interpreter rounds fp32 and fp16 like the GPU (numpy), so those are compared exactly where the math
allows: dequantization bit for bit, and matmuls with one-hot rows (y = 2^p * W[:, k], exact in any summation
order). Its bf16 conversion truncates and its bf16 `tl.dot` multiplies raw bits (Triton 3.6), so bf16 matmuls and
bf16 bit-exactness are left to the GPU tests, as is the shuffle decoder (inline PTX).

TRITON_INTERPRET must be set before triton itself is imported, so the checks run in one subprocess (this file
run as a script); each test reports one check's outcome.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

from loraplex.server.nf4 import reference
from loraplex.server.nf4.format import NF4Weight
from loraplex.server.nf4.kernel_config import KernelConfig

CONFIGS = {
    "gemv-bm4": KernelConfig("gemv", block_m=4, block_n=16, block_k=128),
    "gemv-bm2-split3": KernelConfig("gemv", block_m=2, block_n=32, block_k=64, split_k=3),
    "gemm": KernelConfig("gemm", block_m=16, block_n=32, block_k=128),
    "gemm-swap-split2": KernelConfig("gemm", block_m=16, block_n=16, block_k=64, split_k=2, swap_ab=True),
}
CHECKS: dict[str, Callable] = {}


def check(name: str):
    def deco(fn):
        CHECKS[name] = fn
        return fn
    return deco


def make_weight(segments, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return NF4Weight.quantize([(torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))).to(dtype)
                               for n in segments])


@check("dequant_fp32_fp16_bit_identical")
def _(tk):
    w = make_weight((96, 32, 48), 128, torch.float32, seed=1)  # 352 blocks: nested blocks cross segments' ends
    for dtype in (torch.float32, torch.float16):
        out = torch.full(w.shape, float("nan"), dtype=dtype)
        tk.dequantize(w, dtype, out=out, block_rows=64)
        assert torch.equal(out, reference.dequantize(w, dtype)), dtype


@check("dequant_bf16_within_truncation")
def _(tk):
    w = make_weight((64,), 192, torch.bfloat16, seed=2)
    out = torch.full(w.shape, float("nan"), dtype=torch.bfloat16)
    tk.dequantize(w, torch.bfloat16, out=out, block_rows=64)
    ref = reference.dequantize(w, torch.float32)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -7).all()  # truncation: < 1 bf16 ulp


def one_hot_rows(m, k, dtype, seed):
    """x[i] = 2^p_i e_{k_i}: the matmul returns scaled weight columns, exactly."""
    gen = torch.Generator().manual_seed(seed)
    cols = torch.randint(0, k, (m,), generator=gen)
    cols[-1] = k - 1
    scale = 2.0 ** torch.randint(-2, 3, (m,), generator=gen).float()
    x = torch.zeros(m, k, dtype=dtype)
    x[torch.arange(m), cols] = scale.to(dtype)
    return x, cols, scale


def one_hot_check(tk, cfg, dtype):
    w = make_weight((40, 24), 320, torch.float32, seed=3)  # K = 5 blocks: partial K steps and chunks
    x, cols, scale = one_hot_rows(5, 320, dtype, seed=4)
    out = torch.full((5, 64), float("nan"), dtype=dtype)
    workspace = torch.full((3 * 5 * 64,), float("nan"))
    tk.matmul(x, w, None, False, cfg, out=out, workspace=workspace)
    dense = reference.dequantize(w, dtype)
    expect = (dense[:, cols].t().float() * scale[:, None]).to(dtype)
    assert torch.equal(out, expect)


def random_check(tk, cfg):
    gen = torch.Generator().manual_seed(6)
    w = make_weight((48, 16, 16), 576, torch.float32, seed=7)  # SmolLM2's K: 9 blocks
    g = make_weight((40, 40), 576, torch.float32, seed=8)
    x = torch.randn(3, 576, generator=gen)
    bias = torch.randn(80, generator=gen)
    dense = reference.dequantize(w, torch.float32).double()
    truth = x.double() @ dense.t()
    y = tk.matmul(x, w, None, False, cfg, out=torch.full((3, 80), float("nan")))
    torch.testing.assert_close(y.double(), truth, rtol=1e-5, atol=1e-4)
    yb = tk.matmul(x, w, bias, False, cfg)
    torch.testing.assert_close(yb.double(), truth + bias.double(), rtol=1e-5, atol=1e-4)
    yg = tk.matmul(x, g, None, True, cfg, out=torch.full((3, 40), float("nan")))
    torch.testing.assert_close(yg, reference.linear_gate_up_silu(x, g), rtol=1e-5, atol=1e-4)


@check("matmul_two_m_tiles_strided_x")
def _(tk):
    """M = 18 > block_m = 16 (two M tiles), x a column slice (row stride != K)."""
    w = make_weight((32,), 128, torch.float32, seed=9)
    big = torch.randn(18, 200, generator=torch.Generator().manual_seed(10))
    x = big[:, 8:136]
    cfg = KernelConfig("gemm", block_m=16, block_n=16, block_k=64, split_k=2)
    y = tk.matmul(x, w, None, False, cfg, out=torch.full((18, 32), float("nan")))
    torch.testing.assert_close(y, x @ reference.dequantize(w, torch.float32).t(), rtol=1e-5, atol=1e-4)


@check("dequant_mm_path")
def _(tk):
    w = make_weight((24, 24), 128, torch.float32, seed=11)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(12))
    y = tk.matmul(x, w, None, True, KernelConfig("dequant_mm"))
    assert torch.equal(y, reference.linear_gate_up_silu(x, w))


for _name, _cfg in CONFIGS.items():
    for _dtype in (torch.float32, torch.float16):
        CHECKS[f"one_hot_exact_{_name}_{str(_dtype)[6:]}"] = lambda tk, c=_cfg, d=_dtype: one_hot_check(tk, c, d)
    CHECKS[f"random_fp32_bias_gated_{_name}"] = lambda tk, c=_cfg: random_check(tk, c)


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element arrays and converts them with int(), which numpy >= 2.4
    refuses (loops with runtime bounds fail): convert through the first element instead."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def _run_checks() -> dict[str, str | None]:
    """In the subprocess: every check, None when it passed, else its traceback."""
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set before anything imported triton
    _patch_interpreter_index()
    from loraplex.server.nf4 import triton_kernels as tk

    results = {}
    for name, fn in CHECKS.items():
        try:
            fn(tk)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported by the test of that name
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str | None]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("NF4_CHECKS ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("NF4_CHECKS "))


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_interpreted(outcomes, name):
    assert name in outcomes
    assert outcomes[name] is None, outcomes[name]


if __name__ == "__main__":
    print("NF4_CHECKS " + json.dumps(_run_checks()), flush=True)
