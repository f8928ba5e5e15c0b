"""The fused RMSNorm / rotary Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1) against
the PyTorch twin, fp32 and fp16, poisoned outputs (every element must be written).

Triton decides interpreted vs compiled when it (and each kernel) is imported: this file turns the interpreter on
if nothing imported triton yet, else reruns itself in a fresh interpreted process.
"""
from __future__ import annotations

import pytest
import torch

from ..interpreted import interpret_if_fresh, rerun_interpreted

interpret_if_fresh("test_fused_gpu.py")

from loraplex.server.model import fused, triton_fused  # noqa: E402

INTERPRETED = type(triton_fused._rms_norm_kernel).__name__ == "InterpretedFunction"


def test_in_a_fresh_interpreted_process():
    """When something imported triton before this file (compiled mode), run this file again in a process that
    starts with TRITON_INTERPRET=1."""
    rerun_interpreted(__file__, INTERPRETED)


@pytest.fixture(scope="module")
def kernels():
    if not INTERPRETED:
        pytest.skip("triton was imported in compiled mode: test_in_a_fresh_interpreted_process runs these")
    return triton_fused


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two same-dtype tensors of finite values."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16}[a.dtype]
    return int((a.view(bits).to(torch.int64) - b.view(bits).to(torch.int64)).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 96])  # 96: a row shorter than the power-of-two block
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_twin(kernels, dtype, hidden, with_residual):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    residual = torch.randn(5, hidden, generator=gen).to(dtype) if with_residual else None
    out, summed = kernels.rms_norm(x, weight, 1e-5, residual)
    expected_sum = x + residual if with_residual else x
    if with_residual:
        assert torch.equal(summed, expected_sum)  # the add rounds exactly as torch's does
    else:
        assert summed is None
    expected = fused.rms_norm_reference(expected_sum, weight, 1e-5)
    assert out.dtype == expected.dtype and torch.isfinite(out).all()
    # only the sum of squares' order differs from torch's reduction: a last-place change of the scale, carried
    # through two roundings in fp32, absorbed by fp16's coarser rounding (at most one place)
    assert _ulps(out, expected) <= (4 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (3, 1, 12)])
def test_rotary_matches_twin(kernels, dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    tokens = 7
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    angles = torch.randn(tokens, head_dim // 2, generator=gen) * 3
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q, k = kernels.rotary_qk(qkv, heads, kv_heads, head_dim, cos, sin)
    q_cols = heads * head_dim
    q_ref = fused.apply_rotary(qkv[:, :q_cols].view(tokens, heads, head_dim), cos, sin)
    k_ref = fused.apply_rotary(qkv[:, q_cols:q_cols + kv_heads * head_dim].view(tokens, kv_heads, head_dim), cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)  # the same three roundings as torch, in order


def test_empty_batch(kernels):
    out, summed = kernels.rms_norm(torch.empty(0, 64), torch.ones(64), 1e-6, torch.empty(0, 64))
    assert out.shape == (0, 64) and summed.shape == (0, 64)
    q, k = kernels.rotary_qk(torch.empty(0, 96), 2, 2, 16, torch.empty(0, 16), torch.empty(0, 16))
    assert q.shape == (0, 2, 16) and k.shape == (0, 2, 16)
