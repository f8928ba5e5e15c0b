"""Device pools of LoRA weights per fused projection group (qkv, o, gate_up, down), filled slot by slot.

A group is one base GEMM whose fused output [T, N_total] concatenates J slices (q|k|v, gate|up, or
one module). For every group, shared by all adapter slots:

    a_pool    [J, rows, K_in]  dtype   slice j's A of slot s: a_pool[j, row_start[s] : row_start[s] + rank[j, s]]
    bt_pool   [rows, N_total]  dtype   slice j's B^T of slot s (scale folded in):
                                       bt_pool[row_start[s] : row_start[s] + rank[j, s], n0_j : n0_j + N_j]
    rank      [J, S] int32 (device)    0 = slot s does not adapt slice j (ranks may differ per slice)
    row_start [S] int32 (device)       first pool row of slot s (today slot_order[s] * max_rank)

Kernels read only rows [row_start, row_start + rank): rows beyond a slot's rank are never read, so
`clear` only zeroes ranks and a write never has to zero a previous adapter's leftovers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapters.types import AdapterWeights, SlotPack
from .group_shapes import GROUP_SLICES, ProjectionGroupShape, llama_group_shapes  # noqa: F401 (re-exported)
from .slot_pack import pack_adapter

@dataclass(eq=False)
class LoraGroupStacks:
    """One group's pools (see the module docstring) plus host mirrors for O(1) skip decisions."""

    shape: ProjectionGroupShape
    a_pool: torch.Tensor
    bt_pool: torch.Tensor
    rank: torch.Tensor
    row_start: torch.Tensor
    max_rank: int
    host_rank: np.ndarray
    """[J, S] int: the same values as `rank`, kept on the host."""
    host_row_start: np.ndarray
    adapted_slots: set[int] = field(default_factory=set)
    """Slots with a nonzero rank in at least one slice of this group."""
    slot_max_rank: np.ndarray | None = None
    """[S] int, shared by every group of one LoraStacks: each slot's largest rank in any group (the rank in use
    of a step is its max over the step's slots: lora.apply sizes rank tiles from it)."""

    @property
    def num_slices(self) -> int:
        return len(self.shape.slices)

    @property
    def num_slots(self) -> int:
        return self.host_rank.shape[1]

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        return self.shape.slice_offsets

    @property
    def out_features(self) -> tuple[int, ...]:
        return self.shape.out_features

    def set_rank(self, slot: int, ranks: Sequence[int]) -> None:
        for j, r in enumerate(ranks):
            if self.host_rank[j, slot] != r:
                self.rank[j, slot] = r  # a fill kernel, no host sync
                self.host_rank[j, slot] = r
        if any(ranks):
            self.adapted_slots.add(slot)
        else:
            self.adapted_slots.discard(slot)


class LoraStacks:
    """Every group's pools for `num_slots` adapter slots of rank <= `max_rank`."""

    def __init__(self, shapes: Sequence[ProjectionGroupShape], num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device | str, slot_order: Sequence[int] | None = None):
        """slot_order: a permutation placing slot s at pool rows slot_order[s] * max_rank (default: s)."""
        device = torch.device(device)
        order = np.arange(num_slots) if slot_order is None else np.asarray(slot_order)
        assert sorted(order.tolist()) == list(range(num_slots)), "slot_order must be a permutation of the slots"
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        rows = num_slots * max_rank
        host_row_start = (order * max_rank).astype(np.int64)
        self.groups: dict[tuple[int, str], LoraGroupStacks] = {}
        for shape in shapes:
            key = (shape.layer, shape.name)
            assert key not in self.groups, f"group {key} listed twice"
            j = len(shape.slices)
            self.groups[key] = LoraGroupStacks(
                shape=shape,
                a_pool=torch.zeros(j, rows, shape.in_features, dtype=dtype, device=device),
                bt_pool=torch.zeros(rows, sum(shape.out_features), dtype=dtype, device=device),
                rank=torch.zeros(j, num_slots, dtype=torch.int32, device=device),
                row_start=torch.tensor(host_row_start, dtype=torch.int32).to(device),
                max_rank=max_rank, host_rank=np.zeros((j, num_slots), dtype=np.int64),
                host_row_start=host_row_start)
        self.slot_max_rank = np.zeros(num_slots, dtype=np.int64)
        for g in self.groups.values():
            g.slot_max_rank = self.slot_max_rank
        self._slice_of = {(key[0], module): (key, j) for key, g in self.groups.items()
                          for j, module in enumerate(g.shape.slices)}
        self._targets: list[frozenset[tuple[int, str]]] = [frozenset()] * num_slots

    def group(self, layer: int, name: str) -> LoraGroupStacks:
        return self.groups[(layer, name)]

    @property
    def shapes(self) -> list[ProjectionGroupShape]:
        return [g.shape for g in self.groups.values()]

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy a prepared adapter (scale folded into b: prepare.prepare_for_device) into `slot`, synchronously
        ordered on the current stream: fill then publish. Slices the adapter lacks get rank 0."""
        packed = pack_adapter(adapter, self.shapes, self.max_rank, self.dtype)
        self.clear(slot)  # the old adapter stops being read before its rows change
        self.fill(slot, packed.pack)
        self.publish(slot, packed.pack)

    def fill(self, slot: int, pack: SlotPack, source: torch.Tensor | None = None) -> None:
        """Copy a pack's rows into `slot` of its groups: one copy per pool, on the current stream.

        `source`: a buffer holding the pack's bytes (a pinned staging copy; default the pack's own buffer).
        Ranks are left alone: the slot must not be read (rank 0) until `publish`."""
        self.check_pack(slot, pack)
        for block in pack.blocks:
            g = self.groups[(block.layer, block.name)]
            row0 = int(g.host_row_start[slot])
            g.a_pool[:, row0:row0 + block.rows].copy_(pack.a_view(block, source), non_blocking=True)
            g.bt_pool[row0:row0 + block.rows].copy_(pack.bt_view(block, source), non_blocking=True)

    def publish(self, slot: int, pack: SlotPack) -> None:
        """Make `slot` read as the pack's adapter (its rows must have landed): ranks, targets, max rank."""
        per_group = {block_key: block.ranks for block in pack.blocks
                     for block_key in [(block.layer, block.name)]}
        for key, g in self.groups.items():
            g.set_rank(slot, per_group.get(key, [0] * g.num_slices))
        self._targets[slot] = frozenset((block.layer, module) for block in pack.blocks
                                        for module, r in zip(self.groups[(block.layer, block.name)].shape.slices,
                                                             block.ranks) if r)
        self.slot_max_rank[slot] = max((block.rows for block in pack.blocks), default=0)

    def check_pack(self, slot: int, pack: SlotPack) -> None:
        assert 0 <= slot < self.num_slots, f"slot {slot} outside 0..{self.num_slots - 1}"
        assert pack.dtype == self.dtype, f"pack of {pack.dtype} for pools of {self.dtype}"
        for block in pack.blocks:
            g = self.groups.get((block.layer, block.name))
            assert g is not None and block.rows <= self.max_rank, f"pack block {block.layer}/{block.name} fits no pool"
            assert block.a_shape == (g.num_slices, block.rows, g.shape.in_features), "pack for another layout"

    @property
    def bytes_per_slot(self) -> int:
        """Device bytes one more slot costs (every group's A and B^T rows at max_rank, plus rank entries)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return sum(self.max_rank * (g.num_slices * g.shape.in_features + sum(g.shape.out_features)) * element
                   + g.num_slices * 4 for g in self.groups.values())

    def clear(self, slot: int) -> None:
        """Slot `slot` adapts nothing any more (weights stay; kernels read only `rank` rows)."""
        for g in self.groups.values():
            g.set_rank(slot, [0] * g.num_slices)
        self._targets[slot] = frozenset()
        self.slot_max_rank[slot] = 0

    def slot_targets(self, slot: int) -> frozenset[tuple[int, str]]:
        """(layer, module) pairs the adapter in `slot` adapts (empty when the slot is free)."""
        return self._targets[slot]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups.values()
                   for t in (g.a_pool, g.bt_pool, g.rank, g.row_start))
