"""The fused projection groups of a layer (q|k|v, o, gate|up, down): the shapes the LoRA pools follow."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

GROUP_SLICES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                "down": ("down_proj",)}
"""The fused projection groups of a Llama-family layer, in layer order, and the modules they fuse."""


@dataclass(frozen=True, slots=True)
class ProjectionGroupShape:
    layer: int
    name: str
    """qkv, o, gate_up or down (any name works; GROUP_SLICES lists the Llama ones)."""
    slices: tuple[str, ...]
    """Module names fused in this group, in output-column order, e.g. ('q_proj', 'k_proj', 'v_proj')."""
    in_features: int
    out_features: tuple[int, ...]
    """N_j of each slice; the fused output has sum(out_features) columns."""

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        """n0_j: first fused-output column of each slice."""
        return tuple(itertools.accumulate(self.out_features[:-1], initial=0))


def llama_group_shapes(arch) -> list[ProjectionGroupShape]:
    """qkv, o, gate_up and down of every layer of a Llama-family `ModelArch`."""
    shapes = []
    for layer in range(arch.num_layers):
        for name, slices in GROUP_SLICES.items():
            in_features = arch.linear_shape(slices[0])[0]
            shapes.append(ProjectionGroupShape(layer, name, slices, in_features,
                                               tuple(arch.linear_shape(m)[1] for m in slices)))
    return shapes
