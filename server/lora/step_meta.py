"""Per-step LoRA metadata in static buffers: tokens grouped by their (slot, weight) pairs ("mix groups").

Built once per step in O(sequences + blocks) host work (numpy), written into a pinned staging
buffer and sent with ONE non-blocking copy; shared by every projection group of every layer. The
device tensors never move, so a CUDA graph captured on them replays correctly after a refill.

Sequences with equal pair tuples share a group; base rows (no pairs) belong to no group and are
never touched. With n_g tokens in group g, sorted positions group_start[g] .. + n_g (token_order
maps a position to its row of x / out) are cut into blocks of block_m positions. Blocks 0 ..
num_blocks - 1 are used, in group order; each carries its group's pairs inline (one record per
block), so a kernel program reaches a block's tokens and pairs with one level of loads:

    header           [2]                 int32  num_blocks, num_active_tokens of this step (the kernels plan
                                                their work from them)
    block records    [max_blocks, REC]   int32  REC = 4 + 2 * P_cap columns:
        block_group      group of block b (-1 past num_blocks: informational, the kernels never look there)
        block_start      first sorted position of block b
        block_count      positions in block b (1..block_m)
        block_num_pairs  pairs of block b's group (1..max_pairs)
        block_slots      [P_cap] slot of pair p, -1 pad
        block_weights    [P_cap] fp32 bits: weight of pair p, 0 pad
    token_order      [max_tokens]        int32  row of x/out of sorted position pos (pos < num_active_tokens)

Per-group views (group_num_pairs / group_slots / group_weights) are host-side numpy copies for
tests and diagnostics; neither the kernels nor the twin need them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .kernel_config import MIN_BLOCK_M, block_m_for

_FIXED_COLUMNS = 4  # group, start, count, num_pairs


@dataclass(frozen=True, slots=True)
class LoraStepMeta:
    header: torch.Tensor
    """[2] int32: num_blocks, num_active_tokens on the device (what a replayed graph's kernels read)."""
    block_records: torch.Tensor
    """[max_blocks, 4 + 2 * pair_capacity] int32 (see the module docstring)."""
    token_order: torch.Tensor
    block_group: torch.Tensor
    block_start: torch.Tensor
    block_count: torch.Tensor
    block_num_pairs: torch.Tensor
    block_slots: torch.Tensor
    block_weights: torch.Tensor
    """[max_blocks, pair_capacity] fp32 view of the records."""
    group_num_pairs: np.ndarray
    group_slots: np.ndarray
    group_weights: np.ndarray
    """Host copies, [num_groups] / [num_groups, pair_capacity]: informational."""
    num_tokens: int
    """Rows of x this step (padded count for graphs), adapted or not."""
    num_active_tokens: int
    num_groups: int
    num_blocks: int
    max_pairs: int
    """Most pairs of any group this step (host)."""
    pair_capacity: int
    block_m: int
    max_groups: int
    max_blocks: int
    active_slots: frozenset[int]
    graph_safe: bool
    """Launch from capacities (fixed grids, never skip a group, no step-dependent constants): the meta of a
    captured or replayed graph."""
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    """Per-step host memo (e.g. the rank in use, computed once per step and shared by every group)."""

    @property
    def record_stride(self) -> int:
        return self.block_records.stride(0)

    @property
    def launch_pairs(self) -> int:
        """Pairs per block a launch must allow for: the capacity for graph-safe metas, else this step's most."""
        return self.pair_capacity if self.graph_safe else self.max_pairs


class LoraMetaBuffers:
    """Static device buffers (+ pinned staging) for up to max_tokens tokens, max_groups groups, max_pairs pairs."""

    def __init__(self, max_tokens: int, max_groups: int, max_pairs: int, device: torch.device | str):
        self.device = torch.device(device)
        self.max_tokens, self.max_groups, self.max_pairs = max_tokens, max_groups, max_pairs
        self.max_blocks = -(-max_tokens // MIN_BLOCK_M) + max_groups
        self.record_columns = _FIXED_COLUMNS + 2 * max_pairs
        self._records_at = 2
        self._tokens_at = self._records_at + self.max_blocks * self.record_columns
        size = self._tokens_at + max_tokens
        self._device_buf = torch.zeros(size, dtype=torch.int32, device=self.device)
        if self.device.type == "cuda":  # two staging buffers: fill n+1 while copy n may still be queued
            self._staging = [torch.zeros(size, dtype=torch.int32).pin_memory() for _ in range(2)]
            self._events: list[torch.cuda.Event | None] = [None, None]
        else:
            self._staging, self._events = [self._device_buf], [None]
        self._turn = 0
        buf = self._device_buf
        records = buf[self._records_at:self._tokens_at].view(self.max_blocks, self.record_columns)
        p = max_pairs
        self._views = dict(
            header=buf[:2], block_records=records, token_order=buf[self._tokens_at:],
            block_group=records[:, 0], block_start=records[:, 1], block_count=records[:, 2],
            block_num_pairs=records[:, 3], block_slots=records[:, 4:4 + p],
            block_weights=records[:, 4 + p:4 + 2 * p].view(torch.float32))

    def fill(self, seq_pairs: list[tuple[tuple[int, float], ...]], tokens_per_seq: list[int],
             num_tokens_padded: int | None = None, graph_safe: bool = False) -> LoraStepMeta | None:
        """seq_pairs[i]: sequence i's (slot, weight) pairs (empty = base model); tokens_per_seq[i]: its tokens,
        in token order. Returns None when no token uses an adapter, unless graph_safe (then a meta with
        no used blocks). num_tokens_padded: rows of x when padded (a graph's batch bucket)."""
        counts = np.asarray(tokens_per_seq, dtype=np.int64)
        num_tokens = int(counts.sum())
        padded = num_tokens if num_tokens_padded is None else num_tokens_padded
        if not num_tokens <= padded <= self.max_tokens:
            raise ValueError(f"{num_tokens} tokens (padded {padded}) exceed the LoRA metadata capacity "
                             f"{self.max_tokens}")
        group_of: dict[tuple[tuple[int, float], ...], int] = {}
        seq_group = np.full(len(seq_pairs), -1, dtype=np.int64)
        for i, pairs in enumerate(seq_pairs):  # O(sequences)
            if pairs and tokens_per_seq[i]:
                seq_group[i] = group_of.setdefault(pairs, len(group_of))
        num_groups = len(group_of)
        if num_groups == 0 and not graph_safe:
            return None
        max_pairs = max((len(p) for p in group_of), default=0)
        if num_groups > self.max_groups or max_pairs > self.max_pairs:
            raise ValueError(f"{num_groups} adapter groups with up to {max_pairs} pairs exceed the LoRA "
                             f"metadata capacity ({self.max_groups} groups, {self.max_pairs} pairs)")
        block_m = block_m_for(padded)
        turn = self._turn
        self._turn = (self._turn + 1) % len(self._staging)
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # the copy that last read this staging buffer has run
        stage = self._staging[turn].numpy()
        p_cap = self.max_pairs

        # Groups: pairs and weights (dict order = group order), O(groups * pairs).
        pair_counts = np.fromiter(map(len, group_of), dtype=np.int64, count=num_groups)
        flat_slots = [s for pairs in group_of for s, _ in pairs]
        if flat_slots and min(flat_slots) < 0:
            raise ValueError(f"slot {min(flat_slots)} in the pairs of a sequence (use () for the base model)")
        group_idx = np.repeat(np.arange(num_groups), pair_counts)
        pair_idx = np.arange(len(flat_slots)) - np.repeat(np.cumsum(pair_counts) - pair_counts, pair_counts)
        g_slots = np.full((num_groups, p_cap), -1, dtype=np.int32)
        g_slots[group_idx, pair_idx] = flat_slots
        g_weights = np.zeros((num_groups, p_cap), dtype=np.float32)
        g_weights[group_idx, pair_idx] = [w for pairs in group_of for _, w in pairs]
        active = set(flat_slots)

        # Tokens sorted by group (stable: sequence order, then token order within a sequence).
        adapted = np.nonzero(seq_group >= 0)[0]
        seqs = adapted[np.argsort(seq_group[adapted], kind="stable")]
        lens = counts[seqs]
        seq_start = np.cumsum(counts) - counts
        num_active = int(lens.sum())
        pos_of_seq = np.cumsum(lens) - lens
        order = np.arange(num_active, dtype=np.int64) + np.repeat(seq_start[seqs] - pos_of_seq, lens)
        stage[self._tokens_at:self._tokens_at + num_active] = order

        # Blocks of block_m positions, never straddling two groups, each with its group's pairs (O(blocks)).
        group_tokens = np.bincount(seq_group[adapted], weights=counts[adapted], minlength=num_groups).astype(np.int64)
        group_start = np.cumsum(group_tokens) - group_tokens
        blocks_per_group = -(-group_tokens // block_m)
        num_blocks = int(blocks_per_group.sum())
        assert num_blocks <= self.max_blocks
        first = np.repeat(np.cumsum(blocks_per_group) - blocks_per_group, blocks_per_group)
        start = np.repeat(group_start, blocks_per_group) + (np.arange(num_blocks) - first) * block_m
        block_group = np.repeat(np.arange(num_groups), blocks_per_group)
        stage[0], stage[1] = num_blocks, num_active
        records = stage[self._records_at:self._tokens_at].reshape(self.max_blocks, self.record_columns)
        used = records[:num_blocks]
        used[:, 0] = block_group
        used[:, 1] = start
        used[:, 2] = np.minimum(block_m, np.repeat(group_start + group_tokens, blocks_per_group) - start)
        used[:, 3] = pair_counts[block_group]
        used[:, 4:4 + p_cap] = g_slots[block_group]
        used[:, 4 + p_cap:].view(np.float32)[:] = g_weights[block_group]
        records[num_blocks:, 0] = -1  # informational: the kernels never look past num_blocks

        if self.device.type == "cuda":  # one copy: header, records (unused ones are a few KB) and the used tokens
            used_len = self._tokens_at + num_active
            self._device_buf[:used_len].copy_(self._staging[turn][:used_len], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._events[turn] = event
        return LoraStepMeta(
            **self._views, group_num_pairs=pair_counts.astype(np.int32), group_slots=g_slots,
            group_weights=g_weights, num_tokens=padded, num_active_tokens=num_active, num_groups=num_groups,
            num_blocks=num_blocks, max_pairs=max_pairs, pair_capacity=p_cap, block_m=block_m,
            max_groups=self.max_groups, max_blocks=self.max_blocks, active_slots=frozenset(active),
            graph_safe=graph_safe)
