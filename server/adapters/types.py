"""Validated adapter weights held in host memory, the unit the cache and the mixer work on."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AdapterMismatch
from ..model.arch import LINEAR_MODULES


@dataclass(frozen=True, slots=True)
class ModuleLoRA:
    """One adapted projection: delta W = scale * b @ a."""

    a: torch.Tensor
    """[r, in] (lora_A.weight), in the file's dtype, on the CPU."""
    b: torch.Tensor
    """[out, r] (lora_B.weight), unscaled."""
    scale: float
    """alpha / r, or alpha / sqrt(r) with rsLoRA (rank_pattern / alpha_pattern applied)."""

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, slots=True)
class GroupBlock:
    """One projection group's rows of an adapter in a SlotPack (byte offsets into its buffer).

    a: [J, rows, K_in] at a_offset, bt: [rows, N_total] at bt_offset: exactly the shape of the group's pool
    rows for one slot, so a slot fill is one copy per pool. Slices with rank < rows (or 0) leave rows
    unused: kernels read only rank rows."""

    layer: int
    name: str
    slices: tuple[str, ...]
    """The group's modules in output-column order (q_proj, k_proj, v_proj)."""
    out_features: tuple[int, ...]
    """Columns of each slice in bt (N_j; they sum to N_total)."""
    ranks: tuple[int, ...]
    """Rank of each slice of the group (0: not adapted)."""
    rows: int
    """max(ranks): the pool rows one slot's fill writes."""
    a_offset: int
    a_shape: tuple[int, int, int]
    bt_offset: int
    bt_shape: tuple[int, int]


@dataclass(frozen=True, slots=True)
class SlotPack:
    """A prepared adapter laid out as the device pools want it: every group's A and B^T blocks in one buffer."""

    buffer: torch.Tensor
    """uint8 [num_bytes], on the CPU; each block 64-byte aligned."""
    dtype: torch.dtype
    layout: str
    """Which group shapes the blocks follow (a hash of them): a pack fits only pools of that layout."""
    blocks: tuple[GroupBlock, ...]

    @property
    def num_bytes(self) -> int:
        return self.buffer.numel()

    def a_view(self, block: GroupBlock, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """block's A rows [J, rows, K_in], a view of `buffer` (default: this pack's; any copy of it works)."""
        return _typed_view(self.buffer if buffer is None else buffer, block.a_offset, block.a_shape, self.dtype)

    def bt_view(self, block: GroupBlock, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return _typed_view(self.buffer if buffer is None else buffer, block.bt_offset, block.bt_shape, self.dtype)

    def module_views(self) -> dict[tuple[int, str], ModuleLoRA]:
        """(layer, module) -> A [r, in] and B [out, r] (a transposed view) of every adapted slice, in the buffer."""
        modules = {}
        for block in self.blocks:
            a, bt = self.a_view(block), self.bt_view(block)
            n0 = 0
            for j, (module, rank, n) in enumerate(zip(block.slices, block.ranks, block.out_features)):
                if rank:
                    modules[(block.layer, module)] = ModuleLoRA(a=a[j, :rank], b=bt[:rank, n0:n0 + n].t(), scale=1.0)
                n0 += n
        return modules


def _typed_view(buffer: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return buffer[offset:offset + nbytes].view(dtype).view(*shape)


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """An adapter that passed validation against the base: nothing else reaches a slot."""

    name: str
    modules: dict[tuple[int, str], ModuleLoRA]
    """(layer index, projection name e.g. 'q_proj') -> weights."""
    source: str = ""
    """Folder it came from (or a description for derived adapters)."""
    sha256: str = ""
    """Of adapter_model.safetensors (derived adapters: the content key)."""
    config: dict = field(default_factory=dict)
    """adapter_config.json as read (derived adapters: the mix recipe)."""
    pack: SlotPack | None = None
    """The slot layout of the weights (host tier copies have one; `modules` are then views of its buffer)."""

    @property
    def rank(self) -> int:
        """Largest rank over modules (what the slot must hold)."""
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.modules)

    @property
    def num_bytes(self) -> int:
        """Bytes held: the pack's buffer when packed (with its unused rows), else the modules' tensors."""
        if self.pack is not None:
            return self.pack.num_bytes
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
                   for m in self.modules.values())


def check_fits(adapter: AdapterWeights, arch, max_rank: int) -> None:
    """Shapes and rank against the base: the last guard before weights reach a slot."""
    if not adapter.modules:
        raise AdapterMismatch(f"adapter {adapter.name!r} adapts no module")
    for (layer, module), m in adapter.modules.items():
        if not 0 <= layer < arch.num_layers:
            raise AdapterMismatch(f"adapter {adapter.name!r}: layer {layer} outside the base's {arch.num_layers}")
        if module not in LINEAR_MODULES:
            raise AdapterMismatch(f"adapter {adapter.name!r}: {module!r} is not an adaptable projection")
        n_in, n_out = arch.linear_shape(module)
        if m.a.shape != (m.rank, n_in) or m.b.shape != (n_out, m.rank):
            raise AdapterMismatch(f"adapter {adapter.name!r}: {module} of layer {layer} has A {list(m.a.shape)}, "
                                  f"B {list(m.b.shape)}; the base needs A [r, {n_in}], B [{n_out}, r]")
        if m.rank > max_rank:
            raise AdapterMismatch(f"adapter {adapter.name!r}: rank {m.rank} exceeds the server's max "
                                  f"{max_rank}")
