"""Validated adapter weights held in host memory, the unit the cache and the mixer work on."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
