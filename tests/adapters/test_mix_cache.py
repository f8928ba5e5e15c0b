"""DerivedAdapterCache: one build per key under concurrency, bounded LRU, atomic persistence, reload."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from loraplex.server.adapters.mix import derive_adapter, mix_key
from loraplex.server.adapters.mix_cache import DerivedAdapterCache
from loraplex.server.adapters.types import AdapterWeights, ModuleLoRA
from loraplex.server.types import MergeMethod


def small_adapter(name: str, seed: int) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {(layer, "q_proj"): ModuleLoRA(torch.randn(4, 32, generator=gen), torch.randn(48, 4, generator=gen), 2.0)
               for layer in range(2)}
    return AdapterWeights(name=name, modules=modules, sha256=f"sha-{name}")


class CountingBuilder:
    """A real TIES build that counts its calls (and can be slowed down to overlap threads)."""

    def __init__(self, seed: int = 0, delay: float = 0.0):
        self.calls, self.seed, self.delay = 0, seed, delay
        self.parts = [small_adapter("a", 1), small_adapter("b", 2)]

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay)
        key = mix_key([(p.name, p.sha256) for p in self.parts], [0.6, 0.4], MergeMethod.TIES, 0.5, self.seed, 8)
        return derive_adapter(self.parts, [0.6, 0.4], MergeMethod.TIES, 0.5, self.seed, 8, name="mix", key=key)


def test_concurrent_requests_build_once():
    cache, builder = DerivedAdapterCache(max_entries=4), CountingBuilder(delay=0.2)
    results, barrier = [], threading.Barrier(6)

    def ask():
        barrier.wait()
        results.append(cache.get_or_build("k", builder))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builder.calls == 1 and len(results) == 6 and all(r is results[0] for r in results)
    assert cache.get_or_build("k", builder) is results[0] and builder.calls == 1


def test_lru_is_bounded():
    cache, builder = DerivedAdapterCache(max_entries=2), CountingBuilder()
    for key in ("k1", "k2", "k1", "k3"):  # k1 used again, so k2 is the oldest
        cache.get_or_build(key, builder)
    assert len(cache) == 2 and builder.calls == 3
    assert cache.get("k2") is None and cache.get("k1") is not None
    cache.get_or_build("k2", builder)
    assert builder.calls == 4


def test_failed_build_is_not_cached():
    cache, builder = DerivedAdapterCache(max_entries=2), CountingBuilder()

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_build("k", broken)
    cache.get_or_build("k", builder)
    assert builder.calls == 1


def test_persisted_build_reloads_in_a_fresh_cache(tmp_path):
    builder = CountingBuilder()
    adapter, report = DerivedAdapterCache(2, tmp_path).get_or_build("mix:abc", builder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix:abc.safetensors"]  # no temp file left
    reloaded, reloaded_report = DerivedAdapterCache(2, tmp_path).get_or_build("mix:abc", builder)
    assert builder.calls == 1 and reloaded_report == report
    assert (reloaded.name, reloaded.sha256, reloaded.config) == (adapter.name, adapter.sha256, adapter.config)
    assert set(reloaded.modules) == set(adapter.modules)
    for key, m in adapter.modules.items():
        assert torch.equal(reloaded.modules[key].a, m.a) and torch.equal(reloaded.modules[key].b, m.b)
        assert reloaded.modules[key].scale == 1.0


def test_damaged_file_is_rebuilt(tmp_path):
    (tmp_path / "k.safetensors").write_bytes(b"not a safetensors file")
    builder = CountingBuilder()
    DerivedAdapterCache(2, tmp_path).get_or_build("k", builder)
    DerivedAdapterCache(2, tmp_path).get_or_build("k", builder)
    assert builder.calls == 1  # the rebuild overwrote the damaged file


def test_key_cannot_escape_the_folder(tmp_path):
    with pytest.raises(ValueError):
        DerivedAdapterCache(2, tmp_path).get_or_build("../evil", CountingBuilder())
