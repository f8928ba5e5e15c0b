"""Per-step paged-attention metadata, built once per step and shared by every layer.

A step holds B sequences and T tokens, flattened in sequence order. Sequence b owns rows
query_start[b]:query_start[b+1] of the [T] batch (q_len_b rows, query_start[B] == T). After this step's
K/V writes the cache holds seq_lens[b] tokens of b, and its queries sit at positions
seq_lens[b] - q_len_b .. seq_lens[b] - 1. The token at position p of sequence b lives at the flat KV
position block_tables[b, p // block_size] * block_size + p % block_size of caches shaped
[num_blocks, block_size, kv_heads, head_dim]. Only the first cdiv(seq_lens[b], block_size) entries of
row b are ever read; the rest of the row may hold stale ids. Block 0 is reserved: padded sequences
read and write only block 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class AttentionStepMeta:
    query_start: torch.Tensor
    """[B+1] int32: cumulative query-token counts; sequence b owns rows query_start[b]:query_start[b+1]."""
    seq_lens: torch.Tensor
    """[B] int32: tokens of b in the cache after this step's writes."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32: row b is sequence b's block table."""
    kv_index: torch.Tensor
    """[T] int64: flat KV position each new token writes (block * block_size + offset)."""
    positions: torch.Tensor
    """[T] int64: absolute position of each token in its sequence."""
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    decode_only: bool
    """Every sequence feeds exactly one token (T == B)."""

    @classmethod
    def from_lists(cls, block_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
                   query_lens: Sequence[int], block_size: int, device: torch.device | str) -> AttentionStepMeta:
        """Eager/test builder. context_lens[b] = seq_lens[b]. Rows are kept whole (padded with block 0 to the
        longest), so entries past a sequence's need may hold anything."""
        num_seqs = len(block_tables)
        query_lens_np = np.asarray(query_lens, dtype=np.int64)
        seq_lens_np = np.asarray(context_lens, dtype=np.int64)
        tables = np.zeros((num_seqs, max(1, max(len(row) for row in block_tables))), dtype=np.int32)
        for b, row in enumerate(block_tables):
            tables[b, :len(row)] = row
        _check(query_lens_np, seq_lens_np, block_size, tables.shape[1])
        query_start, positions, kv_index = _index_math(query_lens_np, seq_lens_np, tables, block_size)

        def to(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return cls(query_start=to(query_start), seq_lens=to(seq_lens_np.astype(np.int32)), block_tables=to(tables),
                   kv_index=to(kv_index), positions=to(positions), num_seqs=num_seqs,
                   max_query_len=int(query_lens_np.max()), max_seq_len=int(seq_lens_np.max()),
                   decode_only=bool((query_lens_np == 1).all()))


def _check(query_lens: np.ndarray, seq_lens: np.ndarray, block_size: int, max_blocks: int) -> None:
    assert len(query_lens) == len(seq_lens) >= 1
    assert (query_lens >= 1).all() and (seq_lens >= query_lens).all(), "0 < q_len <= seq_len for every sequence"
    assert int(seq_lens.max()) <= max_blocks * block_size, "a block table is too short for its sequence"


def _index_math(query_lens: np.ndarray, seq_lens: np.ndarray, tables: np.ndarray,
                block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query_start [B+1] int32, positions [T] int64, kv_index [T] int64); O(T) vectorised numpy."""
    num_seqs = len(query_lens)
    query_start = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start[1:])
    first_pos = seq_lens - query_lens  # position of each sequence's first new token
    positions = np.arange(query_start[-1], dtype=np.int64) + np.repeat(first_pos - query_start[:-1], query_lens)
    token_seq = np.repeat(np.arange(num_seqs), query_lens)
    kv_index = tables[token_seq, positions // block_size].astype(np.int64) * block_size + positions % block_size
    return query_start.astype(np.int32), positions, kv_index


class AttentionMetaBuffers:
    """Static-capacity step metadata: `fill` writes a step into pinned staging and issues one non_blocking
    H2D copy (on the current stream) into fixed device buffers, returning views of them: the same views
    (same data pointers) for the same padded sizes, so a CUDA graph captured on them reads each step's
    values. Staging is double-buffered (an event guards reuse), so the host may fill step n+1 while step n's
    copy is still queued. On a CPU device the buffers are written in place."""

    def __init__(self, max_seqs: int, max_tokens: int, max_blocks_per_seq: int, device: torch.device | str,
                 block_size: int = 16, num_staging: int = 2):
        self.max_seqs, self.max_tokens, self.max_blocks_per_seq = max_seqs, max_tokens, max_blocks_per_seq
        self.block_size, self.device = block_size, torch.device(device)
        # byte layout, every region 8-aligned; block tables last so a step copies only a prefix
        sizes = [("query_start", torch.int32, (max_seqs + 1,)), ("seq_lens", torch.int32, (max_seqs,)),
                 ("kv_index", torch.int64, (max_tokens,)), ("positions", torch.int64, (max_tokens,)),
                 ("block_tables", torch.int32, (max_seqs, max_blocks_per_seq))]
        self._layout, offset = {}, 0
        for name, dtype, shape in sizes:
            nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            self._layout[name] = (offset, nbytes, dtype, shape)
            offset += -(-nbytes // 8) * 8
        self._table_offset = self._layout["block_tables"][0]
        on_cuda = self.device.type == "cuda"
        self._device_bytes = torch.zeros(offset, dtype=torch.uint8, device=self.device)
        self._staging = ([torch.zeros(offset, dtype=torch.uint8, pin_memory=True) for _ in range(num_staging)]
                         if on_cuda else [self._device_bytes])
        self._host_views = [{k: v.numpy() for k, v in self._views(buf).items()} for buf in self._staging]
        self._events: list[torch.cuda.Event | None] = [None] * len(self._staging)
        self._next = 0
        self.views = self._views(self._device_bytes)

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: buf[off:off + nbytes].view(dtype).view(shape)
                for name, (off, nbytes, dtype, shape) in self._layout.items()}

    def fill(self, query_lens: Sequence[int] | np.ndarray, seq_lens: Sequence[int] | np.ndarray,
             block_tables: Sequence[Sequence[int] | np.ndarray] | np.ndarray, *, num_seqs: int | None = None,
             num_tokens: int | None = None) -> AttentionStepMeta:
        """One step's metadata. block_tables: per sequence, its block ids (at least cdiv(seq_len, block_size)
        of them; the caller keeps persistent np.int32 rows and appends new blocks, only the needed prefix is
        copied), or a 2-D array whose row b is sequence b's table (one slice copy).

        num_seqs / num_tokens pad the step to a graph bucket: each padded sequence feeds one token at
        position 0 of block 0 (reads and writes only the reserved block 0); tokens left over after that go to
        the last padded sequence. Host work: O(B) plus O(T) vectorised, plus copying the table prefixes."""
        query_lens = np.asarray(query_lens, dtype=np.int64)
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        real_seqs, real_tokens = len(query_lens), int(query_lens.sum())
        num_seqs = real_seqs if num_seqs is None else num_seqs
        num_tokens = real_tokens if num_tokens is None else num_tokens
        pad_seqs, pad_tokens = num_seqs - real_seqs, num_tokens - real_tokens
        assert num_seqs <= self.max_seqs and num_tokens <= self.max_tokens, "step exceeds the buffers' capacity"
        assert pad_seqs >= 0 and pad_tokens >= pad_seqs and (pad_seqs > 0 or pad_tokens == 0), \
            "padding needs one padded sequence per padded token, or more tokens than sequences to pad"
        if pad_seqs:
            pad_lens = np.ones(pad_seqs, dtype=np.int64)
            pad_lens[-1] += pad_tokens - pad_seqs
            query_lens = np.concatenate([query_lens, pad_lens])
            seq_lens = np.concatenate([seq_lens, pad_lens])
        _check(query_lens, seq_lens, self.block_size, self.max_blocks_per_seq)

        stage = self._next
        self._next = (stage + 1) % len(self._staging)
        if self._events[stage] is not None:
            self._events[stage].synchronize()  # that copy was issued two steps ago: normally long done
        host = self._host_views[stage]
        tables = host["block_tables"]
        blocks_needed = -(-seq_lens // self.block_size)
        if isinstance(block_tables, np.ndarray) and block_tables.ndim == 2:
            width = int(blocks_needed[:real_seqs].max()) if real_seqs else 0
            tables[:real_seqs, :width] = block_tables[:real_seqs, :width]
        else:
            assert len(block_tables) == real_seqs
            for b, row in enumerate(block_tables):
                n = int(blocks_needed[b])
                tables[b, :n] = row[:n]
        if pad_seqs:
            tables[real_seqs:num_seqs, :int(blocks_needed[-1])] = 0
        query_start, positions, kv_index = _index_math(query_lens, seq_lens, tables, self.block_size)
        host["query_start"][:num_seqs + 1] = query_start
        host["seq_lens"][:num_seqs] = seq_lens
        host["kv_index"][:num_tokens] = kv_index
        host["positions"][:num_tokens] = positions

        if self.device.type == "cuda":
            end = self._table_offset + num_seqs * self.max_blocks_per_seq * 4
            self._device_bytes[:end].copy_(self._staging[stage][:end], non_blocking=True)
            event = self._events[stage] or torch.cuda.Event()
            event.record()
            self._events[stage] = event
        v = self.views
        return AttentionStepMeta(
            query_start=v["query_start"][:num_seqs + 1], seq_lens=v["seq_lens"][:num_seqs],
            block_tables=v["block_tables"][:num_seqs], kv_index=v["kv_index"][:num_tokens],
            positions=v["positions"][:num_tokens], num_seqs=num_seqs, max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()), decode_only=num_tokens == num_seqs)
