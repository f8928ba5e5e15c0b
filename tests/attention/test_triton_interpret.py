"""The Triton paged-attention kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), tiny shapes,
fp32, against the PyTorch twin; poisoned caches, tables and outputs.

Triton decides interpreted vs compiled when it (and each kernel) is imported: this file turns the
interpreter on if nothing imported triton yet, else reruns itself in a fresh interpreted process.
"""
from __future__ import annotations

import pytest
import torch

from ..interpreted import interpret_if_fresh, rerun_interpreted

interpret_if_fresh("test_gpu.py")

from loraplex.server.attention import reference, triton_paged  # noqa: E402
from loraplex.server.attention.meta import AttentionMetaBuffers  # noqa: E402

from .test_reference import SCENARIOS, dense_attention, make_case  # noqa: E402

INTERPRETED = type(triton_paged._paged_attention_kernel).__name__ == "InterpretedFunction"


def test_in_a_fresh_interpreted_process():
    """When something imported triton before this file (compiled mode), run this file again in a process
    that starts with TRITON_INTERPRET=1."""
    rerun_interpreted(__file__, INTERPRETED)


def _allow_size_one_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with int(array) on a 1-element array, which
    numpy >= 2.4 refuses (a dynamic `range(lo, hi)` then fails); read the one element instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "size_one_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.size_one_index = True
    interpreter._patch_lang_tensor = patched


@pytest.fixture(scope="module")
def kernels():
    if not INTERPRETED:
        pytest.skip("triton was imported in compiled mode: test_in_a_fresh_interpreted_process runs these")
    _allow_size_one_index()
    return triton_paged


def _run(kernels, case, scale, window, **kwargs):
    out = torch.full_like(case.q, float("nan"))  # every row must be written
    got = kernels.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, window, out=out, **kwargs)
    assert got is out and torch.isfinite(got).all()
    return got


@pytest.mark.parametrize("scenario, window, segments, block_m, block_n", [
    ("decode", None, 1, 16, 16),
    ("decode", 5, 4, 16, 32),   # split-KV: 4 segments, some empty
    ("mixed", None, 1, 32, 16),
    ("mixed", 5, 1, 16, 32),
    ("mixed", None, 2, 32, 32),
])
def test_kernel_matches_twin(kernels, scenario, window, segments, block_m, block_n):
    seq_lens, query_lens = SCENARIOS[scenario]
    case = make_case(seq_lens, query_lens, 4, 2, 16, block_size=8, seed=segments)
    scale = 16 ** -0.5
    expect = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, window)
    got = _run(kernels, case, scale, window, num_segments=segments, config=kernels.LaunchConfig(block_m, block_n))
    torch.testing.assert_close(got, expect, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got.double(), dense_attention(case, scale, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, block_size, block_m, block_n", [
    ((9, 3, 24), 16, 16, 16),  # group 3 (5 tokens x 3 heads in 16 rows), padded head_dim
    ((9, 3, 24), 8, 64, 32),   # several tokens per query block, tiles spanning pages
    ((8, 1, 8), 8, 16, 32),    # MQA, head_dim 8 (padded to 16)
    ((4, 4, 16), 4, 16, 16),   # MHA, pages smaller than a tile
])
def test_kernel_shapes(kernels, heads, block_size, block_m, block_n):
    seq_lens, query_lens = [3, 40, 21, 1], [3, 11, 1, 1]  # a fresh prefill, a mid-sequence chunk, decodes
    case = make_case(seq_lens, query_lens, *heads, block_size=block_size, seed=block_m + block_n)
    scale = heads[2] ** -0.5
    expect = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, 7)
    got = _run(kernels, case, scale, 7, num_segments=1, config=kernels.LaunchConfig(block_m, block_n))
    torch.testing.assert_close(got, expect, rtol=2e-6, atol=2e-6)


def test_padded_graph_buffers_give_the_unpadded_result(kernels):
    """A decode step padded to a bucket through AttentionMetaBuffers: real rows equal the unpadded step,
    padded rows (block 0 only) are finite although every block but the sequences' and block 0 is NaN."""
    case = make_case([9, 30, 17], [1, 1, 1], 4, 2, 16, block_size=8, seed=4)
    buffers = AttentionMetaBuffers(max_seqs=8, max_tokens=8, max_blocks_per_seq=6, device="cpu", block_size=8)
    padded_meta = buffers.fill([1, 1, 1], case.seq_lens, case.tables, num_seqs=5, num_tokens=5)
    q = torch.cat([case.q, torch.randn(2, 4, 16)])
    expect = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, 0.25, None)
    for segments in (1, 2):
        out = torch.full_like(q, float("nan"))
        kernels.paged_attention(q, case.k_cache, case.v_cache, padded_meta, 0.25, None, out=out,
                                num_segments=segments)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:3], expect, rtol=2e-6, atol=2e-6)


def test_float16_close_to_twin(kernels):
    """The 16-bit path (P rounded to the cache dtype before PV). fp16 only: Triton 3.6's interpreter
    computes bf16 tl.dot on garbage (bf16 is covered by test_gpu.py)."""
    case = make_case([12, 33], [12, 1], 4, 2, 16, block_size=8, dtype=torch.float16, seed=9)
    expect = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, 0.25, None)
    got = _run(kernels, case, 0.25, None, num_segments=2, config=kernels.LaunchConfig(16, 16))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expect.float(), rtol=2e-3, atol=2e-3)


def test_write_kv_matches_twin_on_strided_inputs(kernels):
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(5, 6 + 2 * 2, 24, generator=gen)  # fused projection output: k, v are strided views
    k, v = qkv[:, 6:8], qkv[:, 8:10]
    kv_index = torch.tensor([9, 3, 22, 4, 10])
    caches = [torch.full((6, 4, 2, 24), float("nan")) for _ in range(4)]
    kernels.write_kv(caches[0], caches[1], k, v, kv_index)
    reference.write_kv(caches[2], caches[3], k, v, kv_index)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))
    assert int(torch.isfinite(caches[0]).sum()) == 5 * 2 * 24
