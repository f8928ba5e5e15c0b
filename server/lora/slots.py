"""Moving adapters in and out of the model's fixed LoRA slots.

Every adapted projection holds `lora_a [S, R, in]` and `lora_b_by_out [out, S, R]`. Writing an
adapter into slot s fills A rows / B columns [:r] and zeroes the rest of that slot in every
projection, so a slot never leaks a previous adapter's weights into modules the new one lacks.
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


def write_slot(model, slot: int, adapter: AdapterWeights) -> None:
    """Copy a prepared adapter (scale folded, see prepare_for_device) into `slot` of every projection."""
    for layer, name, projection in model.projections():
        module = adapter.modules.get((layer, name))
        a_slot = projection.lora_a[slot]  # [R, in]
        b_slot = projection.lora_b_by_out[:, slot]  # [out, R]
        if module is None:
            a_slot.zero_()
            b_slot.zero_()
            continue
        rank = module.rank
        if rank > a_slot.shape[0]:
            raise ValueError(f"adapter {adapter.name!r}: rank {rank} exceeds slot rank {a_slot.shape[0]}")
        a_slot[:rank].copy_(module.a, non_blocking=True)
        b_slot[:, :rank].copy_(module.b, non_blocking=True)
        if rank < a_slot.shape[0]:
            a_slot[rank:].zero_()
            b_slot[:, rank:].zero_()


def clear_slot(model, slot: int) -> None:
    for _, _, projection in model.projections():
        projection.lora_a[slot].zero_()
        projection.lora_b_by_out[:, slot].zero_()
