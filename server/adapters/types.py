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

    @property
    def rank(self) -> int:
        """Largest rank over modules (what the slot must hold)."""
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.modules)

    @property
    def num_bytes(self) -> int:
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
