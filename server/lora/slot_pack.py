"""Slot packs: a prepared adapter laid out as one slot of the device pools, so a fill is one copy per pool.

For every projection group the adapter adapts, the pack holds

    a  [J, rows, K_in]   a[j, :rank_j] = A of slice j        (what a_pool[:, row_start : row_start + rows] takes)
    bt [rows, N_total]   bt[:rank_j, n0_j : n0_j + N_j] = B_j^T  (what bt_pool[row_start : row_start + rows] takes)

with rows = the group's largest slice rank. Rows past a slice's rank (and slices the adapter does not adapt)
stay zero here and are never read on the device: the kernels read only rank rows. The module views
(`SlotPack.module_views`) point into the same buffer, so mixes and checks see the same bytes.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..adapters.types import AdapterWeights, GroupBlock, SlotPack
from ..errors import AdapterMismatch
from .group_shapes import ProjectionGroupShape

ALIGN = 64


def layout_id(shapes: Sequence[ProjectionGroupShape]) -> str:
    """A short hash of the group shapes a pack follows (part of a prepared image's key)."""
    text = repr([(s.layer, s.name, s.slices, s.in_features, s.out_features) for s in shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack_adapter(adapter: AdapterWeights, shapes: Sequence[ProjectionGroupShape], max_rank: int,
                 dtype: torch.dtype | None = None) -> AdapterWeights:
    """`adapter` (prepared: scales 1.0, one dtype) with a SlotPack for pools of `shapes`; modules become views.

    `dtype`: the pack's, when the adapter has no module to take it from (an adapter adapting nothing)."""
    dtype = next(iter(adapter.modules.values())).a.dtype if adapter.modules else dtype
    assert dtype is not None, "an adapter with no module needs the pack's dtype"
    layout = layout_id(shapes)
    if adapter.pack is not None and adapter.pack.layout == layout and adapter.pack.dtype == dtype:
        return adapter
    slice_of = {(s.layer, module): (s, j) for s in shapes for j, module in enumerate(s.slices)}
    ranks: dict[tuple[int, str], list[int]] = {}
    for (layer, module), m in adapter.modules.items():
        where = slice_of.get((layer, module))
        if where is None:
            raise AdapterMismatch(f"adapter {adapter.name!r}: {module} of layer {layer} is in no projection group")
        shape, j = where
        n_out, n_in = shape.out_features[j], shape.in_features
        if m.rank > max_rank:
            raise AdapterMismatch(f"adapter {adapter.name!r}: {module} of layer {layer} has rank {m.rank}, "
                                  f"above the slot rank {max_rank}")
        if m.a.shape != (m.rank, n_in) or m.b.shape != (n_out, m.rank):
            raise AdapterMismatch(f"adapter {adapter.name!r}: {module} of layer {layer} has A {list(m.a.shape)}, "
                                  f"B {list(m.b.shape)}; the group needs A [r, {n_in}], B [{n_out}, r]")
        assert m.scale == 1.0 and m.a.dtype == m.b.dtype == dtype, "pack_adapter takes prepared adapters"
        ranks.setdefault((shape.layer, shape.name), [0] * len(shape.slices))[j] = m.rank
    element = dtype.itemsize
    blocks, offset = [], 0
    for shape in shapes:
        group_ranks = ranks.get((shape.layer, shape.name))
        if group_ranks is None:
            continue
        rows = max(group_ranks)
        a_shape = (len(shape.slices), rows, shape.in_features)
        bt_shape = (rows, sum(shape.out_features))
        a_offset = offset
        bt_offset = _aligned(a_offset + a_shape[0] * a_shape[1] * a_shape[2] * element)
        offset = _aligned(bt_offset + bt_shape[0] * bt_shape[1] * element)
        blocks.append(GroupBlock(shape.layer, shape.name, shape.slices, shape.out_features, tuple(group_ranks), rows,
                                 a_offset, a_shape, bt_offset, bt_shape))
    pack = SlotPack(buffer=torch.zeros(offset, dtype=torch.uint8), dtype=dtype, layout=layout, blocks=tuple(blocks))
    by_group = {(s.layer, s.name): s for s in shapes}
    for block in blocks:
        shape = by_group[(block.layer, block.name)]
        a, bt = pack.a_view(block), pack.bt_view(block)
        for j, module in enumerate(shape.slices):
            m = adapter.modules.get((block.layer, module))
            if m is not None:
                n0, n = shape.slice_offsets[j], shape.out_features[j]
                a[j, :m.rank].copy_(m.a)
                bt[:m.rank, n0:n0 + n].copy_(m.b.t())
    return AdapterWeights(name=adapter.name, modules=pack.module_views(), source=adapter.source,
                          sha256=adapter.sha256, config=adapter.config, pack=pack)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
