"""The PyTorch twin of paged attention against a naive per-sequence dense causal attention in float64; the step
metadata builders.

`make_case` and `dense_attention` are shared with the Triton tests: a case scatters each sequence's
logical K/V over a non-contiguous block table into a cache whose every other position is poison (NaN, or
large finite values for block 0), and its rows carry extra entries pointing at poisoned spare blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from loraplex.server.attention import ops, reference
from loraplex.server.attention.meta import AttentionMetaBuffers, AttentionStepMeta


@dataclass
class Case:
    q: torch.Tensor
    """[T, Hq, D]"""
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionStepMeta
    keys: list[torch.Tensor]
    """Per sequence, its logical K [seq_len, Hkv, D] (on the CPU, in the cache dtype)."""
    values: list[torch.Tensor]
    tables: list[list[int]]
    """Block tables without the poison tails."""
    seq_lens: list[int]
    query_lens: list[int]
    block_size: int


def make_case(seq_lens, query_lens, num_heads=4, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32,
              seed=0, device="cpu", spare_blocks=3, tail_entries=2, poison=float("nan"), q_std=1.0) -> Case:
    """K, V ~ N(0, 1); q ~ N(0, q_std) (a larger q_std makes attention peaked, so a wrong key shows)."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    counts = [-(-n // block_size) for n in seq_lens]
    used = sum(counts)
    perm = (torch.randperm(used + spare_blocks, generator=gen) + 1).tolist()  # blocks 1..N, shuffled
    spare, perm = perm[used:], perm[:used]
    tables, rows, start = [], [], 0
    for n in counts:
        tables.append(perm[start:start + n])
        rows.append(tables[-1] + spare[:tail_entries])  # entries past the need point at poisoned blocks
        start += n
    shape = (used + spare_blocks + 1, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, poison, dtype=dtype, device=device)
    v_cache = torch.full(shape, poison, dtype=dtype, device=device)
    k_cache[0] = (1e3 * torch.randn(shape[1:], generator=gen, dtype=draw)).to(dtype)  # padding block: finite
    v_cache[0] = (1e3 * torch.randn(shape[1:], generator=gen, dtype=draw)).to(dtype)
    keys, values = [], []
    for table, n in zip(tables, seq_lens):
        k = torch.randn(n, kv_heads, head_dim, generator=gen, dtype=draw).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen, dtype=draw).to(dtype)
        pos = torch.arange(n)
        blocks, offsets = torch.tensor(table)[pos // block_size].to(device), (pos % block_size).to(device)
        k_cache[blocks, offsets] = k.to(device)
        v_cache[blocks, offsets] = v.to(device)
        keys.append(k)  # what the cache holds, in its dtype (CPU)
        values.append(v)
    q = (q_std * torch.randn(sum(query_lens), num_heads, head_dim, generator=gen, dtype=draw)).to(dtype)
    meta = AttentionStepMeta.from_lists(rows, seq_lens, query_lens, block_size, device)
    return Case(q.to(device), k_cache, v_cache, meta, keys, values, tables, list(seq_lens), list(query_lens),
                block_size)


def dense_attention(case: Case, scale: float, window: int | None) -> torch.Tensor:
    """Token by token, from the logical K/V: float64 [T, Hq, D]."""
    q = case.q.double().cpu()
    num_heads, kv_heads = q.shape[1], case.keys[0].shape[1]
    out = torch.empty_like(q)
    t = 0
    for k, v, n, q_len in zip(case.keys, case.values, case.seq_lens, case.query_lens):
        k = k.double().repeat_interleave(num_heads // kv_heads, dim=1)  # [n, Hq, D]
        v = v.double().repeat_interleave(num_heads // kv_heads, dim=1)
        for pos in range(n - q_len, n):
            lo = 0 if window is None else max(0, pos - window + 1)
            scores = torch.einsum("hd,lhd->hl", q[t], k[lo:pos + 1]) * scale
            out[t] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v[lo:pos + 1])
            t += 1
    return out


SCENARIOS = {
    # name: (seq_lens, query_lens)
    "decode": ([1, 7, 16, 33, 50], [1, 1, 1, 1, 1]),
    "chunk_mid_sequence": ([37], [13]),
    "prefill_from_zero": ([23], [23]),
    "mixed": ([12, 15, 9, 4, 40], [1, 9, 9, 1, 17]),
}
HEADS = {"gqa": (4, 2, 16), "group3_odd_dim": (9, 3, 24), "mqa": (8, 1, 8), "mha": (3, 3, 16)}
WINDOWS = [None, 1, 5, 64]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_twin_matches_dense_float64(scenario, heads, window):
    seq_lens, query_lens = SCENARIOS[scenario]
    num_heads, kv_heads, head_dim = HEADS[heads]
    case = make_case(seq_lens, query_lens, num_heads, kv_heads, head_dim, block_size=4, dtype=torch.float64,
                     seed=len(scenario) + num_heads)
    scale = head_dim ** -0.5
    expect = dense_attention(case, scale, window)
    out = torch.full_like(case.q, float("nan"))
    got = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, window, out=out)
    assert got is out and torch.isfinite(got).all()
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_window_and_causality_change_the_result():
    """Negative controls: the oracle distinguishes windows, and a future key would change the output."""
    case = make_case([30], [30], seed=3)
    scale = 0.25
    full = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, None)
    windowed = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, 4)
    assert torch.equal(full[:4], windowed[:4]) and not torch.allclose(full[4:], windowed[4:])
    case.k_cache[case.tables[0][-1], (30 - 1) % 4] += 1.0  # the last key: seen only by the last query
    again = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, None)
    assert torch.equal(again[:-1], full[:-1]) and not torch.allclose(again[-1], full[-1])


def test_write_kv_writes_exactly_the_indexed_positions():
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.full((6, 4, 2, 8), float("nan"))
    v_cache = torch.full((6, 4, 2, 8), float("nan"))
    k, v = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    kv_index = torch.tensor([9, 3, 22, 4, 10])
    ops.write_kv(k_cache, v_cache, k, v, kv_index)
    for t, i in enumerate(kv_index.tolist()):
        assert torch.equal(k_cache[i // 4, i % 4], k[t]) and torch.equal(v_cache[i // 4, i % 4], v[t])
    assert int(torch.isfinite(k_cache).sum()) == int(torch.isfinite(v_cache).sum()) == 5 * 2 * 8


# --------------------------------------------------------------------------------------------- metadata

def test_from_lists_fields():
    meta = AttentionStepMeta.from_lists([[5, 2, 9], [7], [3, 4]], [9, 1, 6], [3, 1, 6], 4, "cpu")
    assert meta.query_start.dtype == meta.seq_lens.dtype == meta.block_tables.dtype == torch.int32
    assert meta.kv_index.dtype == meta.positions.dtype == torch.int64
    assert meta.query_start.tolist() == [0, 3, 4, 10]
    assert meta.seq_lens.tolist() == [9, 1, 6]
    assert meta.positions.tolist() == [6, 7, 8, 0, 0, 1, 2, 3, 4, 5]
    assert meta.kv_index.tolist() == [2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0, 7 * 4, 12, 13, 14, 15, 16, 17]
    assert meta.block_tables.tolist() == [[5, 2, 9], [7, 0, 0], [3, 4, 0]]
    assert (meta.num_seqs, meta.max_query_len, meta.max_seq_len, meta.decode_only) == (3, 6, 9, False)
    decode = AttentionStepMeta.from_lists([[5, 2, 9], [7]], [9, 1], [1, 1], 4, "cpu")
    assert decode.decode_only and decode.positions.tolist() == [8, 0] and decode.kv_index.tolist() == [36, 28]


def _meta_lists(meta: AttentionStepMeta, block_size: int) -> tuple:
    """The fields a kernel reads: the needed prefix of each table row, not the stale tail."""
    seq_lens = meta.seq_lens.tolist()
    rows = [meta.block_tables[b, :-(-n // block_size)].tolist() for b, n in enumerate(seq_lens)]
    return (meta.query_start.tolist(), seq_lens, rows, meta.kv_index.tolist(), meta.positions.tolist(),
            meta.num_seqs, meta.max_query_len, meta.max_seq_len, meta.decode_only)


def test_buffers_fill_equals_from_lists_and_keeps_its_views():
    buffers = AttentionMetaBuffers(max_seqs=8, max_tokens=64, max_blocks_per_seq=6, device="cpu", block_size=4)
    rows = [np.array([5, 2, 9, 11, 12, 13], dtype=np.int32), np.array([7, 8], dtype=np.int32),
            np.array([3, 4, 6], dtype=np.int32)]
    steps = [([3, 1, 6], [9, 1, 6]), ([1, 1, 1], [10, 2, 7]), ([8, 1, 2], [18, 3, 9])]
    pointers = None
    for query_lens, seq_lens in steps:
        expect = AttentionStepMeta.from_lists([r.tolist() for r in rows], seq_lens, query_lens, 4, "cpu")
        for tables in (rows, np.stack([np.resize(r, 6) for r in rows])):  # per-row arrays, or one 2-D array
            meta = buffers.fill(query_lens, seq_lens, tables, num_seqs=4, num_tokens=sum(query_lens) + 1)
            query_start, lens, table_rows, kv_index, positions = _meta_lists(expect, 4)[:5]
            # one padded sequence: one token at position 0 of block 0
            assert _meta_lists(meta, 4)[:5] == (query_start + [query_start[-1] + 1], lens + [1],
                                                table_rows + [[0]], kv_index + [0], positions + [0])
            ptrs = [t.data_ptr() for t in (meta.query_start, meta.seq_lens, meta.block_tables, meta.kv_index)]
            assert pointers in (None, ptrs)  # the same buffers every step: what a CUDA graph captured
            pointers = ptrs
        unpadded = buffers.fill(query_lens, seq_lens, rows)
        assert _meta_lists(unpadded, 4) == _meta_lists(expect, 4)


def test_buffers_padding_to_a_decode_bucket():
    buffers = AttentionMetaBuffers(max_seqs=8, max_tokens=8, max_blocks_per_seq=4, device="cpu", block_size=4)
    meta = buffers.fill([1, 1], [5, 9], [[3, 1], [2, 6, 7]], num_seqs=4, num_tokens=4)
    assert meta.decode_only and meta.num_seqs == 4
    assert meta.query_start.tolist() == [0, 1, 2, 3, 4] and meta.seq_lens.tolist() == [5, 9, 1, 1]
    assert meta.kv_index.tolist() == [4, 28, 0, 0] and meta.positions.tolist() == [4, 8, 0, 0]
    assert meta.block_tables[2:, 0].tolist() == [0, 0]
    # padded rows attend only to block 0 and stay finite even though every other block is NaN
    cache = torch.full((8, 4, 1, 16), float("nan"))
    cache[0] = torch.randn(4, 1, 16)
    cache[[3, 1, 2, 6, 7]] = torch.randn(5, 4, 1, 16)
    out = reference.paged_attention(torch.randn(4, 2, 16), cache, cache, meta, 0.25, None)
    assert torch.isfinite(out).all()


def test_buffers_padding_with_more_tokens_than_sequences():
    buffers = AttentionMetaBuffers(max_seqs=4, max_tokens=16, max_blocks_per_seq=4, device="cpu", block_size=4)
    meta = buffers.fill([3], [3], [[2]], num_seqs=2, num_tokens=9)
    assert meta.query_start.tolist() == [0, 3, 9] and meta.seq_lens.tolist() == [3, 6]
    assert meta.kv_index.tolist() == [8, 9, 10, 0, 1, 2, 3, 0, 1] and not meta.decode_only
    assert meta.block_tables[1, :2].tolist() == [0, 0]
