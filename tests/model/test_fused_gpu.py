"""The fused RMSNorm / rotary kernels compiled on CUDA (bf16, fp16) against the PyTorch twin, in CUDA graphs,
and the embedded model in bf16 with the kernels vs with the twin."""
from __future__ import annotations

import pytest
import torch

from loraplex.server.config import ModelConfig
from loraplex.server.model import fused
from loraplex.server.model.loader import load_model

from .harness import PagedSequence, new_kv_cache, step

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int16).to(torch.int32) - b.view(torch.int16).to(torch.int32)).abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (37, 576), (300, 5120)])
def test_rms_norm_matches_twin(dtype, rows, hidden):
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, hidden, device="cuda", generator=gen).to(dtype)
    residual = torch.randn(rows, hidden, device="cuda", generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).to(dtype)
    out, summed = fused.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, x + residual)
    expected = fused.rms_norm_reference(x + residual, weight, 1e-5)
    # Only the order of the sum of squares differs from torch: a last-place change of the fp32 scale can move
    # rnd(x * scale) by one place and the weight product by one more (seen on an H200: fp16, 300 x 5120, 2 places)
    diff = _ulps(out, expected)
    assert int(diff.max()) <= 2 and float((diff == 0).float().mean()) > 0.99
    plain = fused.rms_norm(x, weight, 1e-5)
    assert int(_ulps(plain, fused.rms_norm_reference(x, weight, 1e-5)).max()) <= 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(1, 32, 8, 128), (33, 9, 3, 64)])
def test_rotary_is_bit_identical_to_twin(dtype, tokens, heads, kv_heads, head_dim):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", generator=gen).to(dtype)
    angles = torch.rand(tokens, head_dim // 2, device="cuda", generator=gen) * 4000
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q, k = fused.rotary_qk(qkv, heads, kv_heads, head_dim, cos, sin)
    q_cols = heads * head_dim
    assert torch.equal(q, fused.apply_rotary(qkv[:, :q_cols].view(tokens, heads, head_dim), cos, sin))
    assert torch.equal(k, fused.apply_rotary(qkv[:, q_cols:q_cols + kv_heads * head_dim].view(tokens, kv_heads,
                                                                                                 head_dim), cos, sin))


def test_kernels_replay_in_a_cuda_graph():
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(8, 6144, device="cuda", dtype=torch.bfloat16)
    cos, sin = torch.rand(8, 128, device="cuda", dtype=torch.bfloat16), torch.rand(8, 128, device="cuda",
                                                                                   dtype=torch.bfloat16)
    eager = (fused.add_rms_norm(x, residual, weight, 1e-6), fused.rotary_qk(qkv, 32, 8, 128, cos, sin))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm up outside the capture
        fused.add_rms_norm(x, residual, weight, 1e-6)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = (fused.add_rms_norm(x, residual, weight, 1e-6), fused.rotary_qk(qkv, 32, 8, 128, cos, sin))
    x.add_(1.0)  # new inputs in place: the replay must read them
    graph.replay()
    torch.cuda.synchronize()
    fresh = (fused.add_rms_norm(x, residual, weight, 1e-6), fused.rotary_qk(qkv, 32, 8, 128, cos, sin))
    for got, want in zip([*captured[0], *captured[1]], [*fresh[0], *fresh[1]]):
        assert torch.equal(got, want)
    assert not torch.equal(captured[0][0], eager[0][0])


def test_embedded_model_bf16_kernels_vs_twin(embedded_dir, monkeypatch):
    """The whole model in bf16: logits with the fused kernels stay within bf16 noise of the twin's."""
    model = load_model(ModelConfig(path=str(embedded_dir), quantization="none", dtype="bfloat16", device="cuda"))
    tokens = [1, 504, 3458, 282, 4649, 314, 253, 1789, 30, 2, 9]

    def logits() -> torch.Tensor:
        cache = new_kv_cache(model, num_blocks=8, block_size=16)
        seq = PagedSequence(tokens, block_table=[1, 2])
        return step(model, cache, 16, [(seq, None)], all_tokens=True).float()

    with_kernels = logits()
    monkeypatch.setattr(fused, "_kernels", lambda x: None)
    with_twin = logits()
    rel = float((with_kernels - with_twin).norm() / with_twin.norm())
    assert rel < 2e-2, rel
    agree = float((with_kernels.argmax(-1) == with_twin.argmax(-1)).float().mean())
    assert agree >= 0.8, agree
