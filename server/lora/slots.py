"""The engine's fixed LoRA slots, and moving adapters in and out of them.

For every adapted projection (in model order) two stacks shared by all adapters:
lora_a [S, R, in] and lora_b_by_out [out, S, R] (B output-major, so a contiguous range of slots is
a view of the rank-concatenated [out, U*R] matrix). Writing an adapter into slot s fills A rows /
B columns [:r] and zeroes the rest of that slot in every projection, so a slot never leaks a
previous adapter's weights into modules the new one lacks.
"""
from __future__ import annotations

import torch

from ..adapters.types import AdapterWeights, ModuleLoRA


def prepare_for_device(adapter: AdapterWeights, dtype: torch.dtype, pin: bool) -> AdapterWeights:
    """Fold each module's scale into B (in fp32), cast to the compute dtype, pin for async copies.

    Done once when an adapter enters the host tier, so a slot write is plain copies."""
    modules = {}
    for key, m in adapter.modules.items():
        a = m.a.to(dtype).contiguous()
        b = (m.b.float() * m.scale).to(dtype).contiguous()
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        modules[key] = ModuleLoRA(a=a, b=b, scale=1.0)
    return AdapterWeights(name=adapter.name, modules=modules, source=adapter.source, sha256=adapter.sha256,
                          config=adapter.config)


class LoraSlots:
    def __init__(self, model, num_slots: int, max_rank: int):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.keys = [(layer, name) for layer, name, _ in model.projections()]
        self.stacks = [
            (torch.zeros(num_slots, max_rank, p.in_features, dtype=model.dtype, device=model.device),
             torch.zeros(p.out_features, num_slots, max_rank, dtype=model.dtype, device=model.device))
            for _, _, p in model.projections()]

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy a prepared adapter (scale folded, see prepare_for_device) into `slot` of every projection."""
        for (layer, name), (lora_a, lora_b_by_out) in zip(self.keys, self.stacks):
            module = adapter.modules.get((layer, name))
            a_slot, b_slot = lora_a[slot], lora_b_by_out[:, slot]  # [R, in], [out, R]
            if module is None:
                a_slot.zero_()
                b_slot.zero_()
                continue
            rank = module.rank
            if rank > self.max_rank:
                raise ValueError(f"adapter {adapter.name!r}: rank {rank} exceeds slot rank {self.max_rank}")
            a_slot[:rank].copy_(module.a, non_blocking=True)
            b_slot[:, :rank].copy_(module.b, non_blocking=True)
            if rank < self.max_rank:
                a_slot[rank:].zero_()
                b_slot[:, rank:].zero_()

    def clear(self, slot: int) -> None:
        for lora_a, lora_b_by_out in self.stacks:
            lora_a[slot].zero_()
            lora_b_by_out[:, slot].zero_()

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.stacks)
