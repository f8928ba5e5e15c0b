"""Turning a request's adapter choice into what the sequence needs: cache keys, weights, loaders.

LINEAR mixes stay exact and per request: each named adapter occupies its own slot and every token
carries (slot, weight) pairs. TIES / DARE build one derived adapter, keyed by content, once.
"""
from __future__ import annotations

from ..adapters.mix import derive_adapter, mix_key
from ..errors import InvalidAdapter
from ..types import GenerationRequest, MergeMethod
from .sequence import AdapterNeed


def resolve_adapters(engine, request: GenerationRequest) -> tuple[tuple[AdapterNeed, ...], dict[str, int]]:
    """(needs, {adapter name: version}) for a validated request; AdapterNotFound names a missing one."""
    if request.adapter:
        entry = engine.catalog.get(request.adapter)
        return (AdapterNeed(entry.key, 1.0, engine._disk_loader(entry)),), {entry.name: entry.version}
    if not request.adapters:
        return (), {}
    entries = [engine.catalog.get(item.name) for item in request.adapters]
    weights = [item.weight for item in request.adapters]
    versions = {entry.name: entry.version for entry in entries}
    if request.merge_method is MergeMethod.LINEAR:
        return tuple(AdapterNeed(e.key, w, engine._disk_loader(e)) for e, w in zip(entries, weights)), versions
    rank = engine.config.lora.derived_rank
    key = "mix:" + mix_key([(e.name, f"{e.version}:{e.sha256}") for e in entries], weights, request.merge_method,
                           request.density, request.merge_seed, rank)
    part_keys = tuple(e.key for e in entries)

    def derive():
        parts = [engine.cache.host_get(k) for k in part_keys]
        if any(p is None for p in parts):
            raise InvalidAdapter(f"{key}: a part of the mix left host memory before the mix was built")
        return derive_adapter(parts, weights, request.merge_method, request.density, request.merge_seed, rank,
                              name=key, device=str(engine.device), key=key)

    def build():
        derived, report = engine.derived_adapters.get_or_build(key, derive)
        engine.mix_reports[key] = report
        return derived

    return (AdapterNeed(key, 1.0, build, depends_on=part_keys),), versions
