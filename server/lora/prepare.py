"""Adapters prepared for the device pools: scale folded into B, compute dtype, pinned host memory."""
from __future__ import annotations

import torch

from ..adapters.types import AdapterWeights, ModuleLoRA


def prepare_for_device(adapter: AdapterWeights, dtype: torch.dtype, pin: bool) -> AdapterWeights:
    """Fold each module's scale into B (in fp32), cast to the compute dtype, pin for async copies.

    Done once when an adapter enters the host tier, so a slot write is plain copies. Weights already in
    that form (read from a prepared image, or packed for the slots) are returned as they are: no copy, no
    second pin."""
    if adapter.pack is not None and adapter.pack.dtype == dtype and not pin:
        return adapter
    if all(_prepared(m, dtype, pin) for m in adapter.modules.values()):
        return adapter
    modules = {}
    for key, m in adapter.modules.items():
        a = m.a.to(dtype).contiguous()
        b = (m.b.float() * m.scale).to(dtype).contiguous()
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        modules[key] = ModuleLoRA(a=a, b=b, scale=1.0)
    return AdapterWeights(name=adapter.name, modules=modules, source=adapter.source, sha256=adapter.sha256,
                          config=adapter.config)


def _prepared(m: ModuleLoRA, dtype: torch.dtype, pin: bool) -> bool:
    return (m.scale == 1.0 and m.a.dtype == m.b.dtype == dtype and m.a.is_contiguous() and m.b.is_contiguous()
            and (not pin or (m.a.is_pinned() and m.b.is_pinned())))
