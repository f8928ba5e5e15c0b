"""Adapter loads and slot fills never hold up the running batch (CPU, the real engine on the embedded model).

The slow source is the adapter's prepared image replaced by a named pipe that a thread feeds in small chunks
over about 1.5 s: the host miss really waits on it, on the loader thread."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from loraplex.server.adapters.types import AdapterWeights
from loraplex.server.config import LoRAConfig
from loraplex.server.errors import ConfigError, ResourceExhausted
from loraplex.server.lora.slot_budget import slots_that_fit
from loraplex.server.lora.slot_filler import SlotFiller
from loraplex.server.lora.slot_pack import pack_adapter
from loraplex.server.lora.prepare import prepare_for_device
from loraplex.server.lora.staging import GRANULE, StagingPool
from loraplex.server.lora.stacks import LoraStacks

from .test_engine_behaviour import make_engine, req

FEED_SECONDS = 1.5


def _feed_slowly(fifo, raw: bytes, chunks: int = 30) -> None:
    with open(fifo, "wb") as f:  # blocks until the loader opens the image
        step = -(-len(raw) // chunks)
        for start in range(0, len(raw), step):
            f.write(raw[start:start + step])
            f.flush()
            time.sleep(FEED_SECONDS / chunks)


def test_a_slow_adapter_load_does_not_delay_the_running_request(smol_fp32, peft_adapters, tmp_path):
    """While `slow`'s image trickles in, the running request gets a token on every step (the step counter
    moves by one per token: not one step lost), and `slow` is served, with its own adapter's tokens, after."""
    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path, max_loras=1, max_cpu_loras=1)
    images = tmp_path / "cache" / "adapter-images"
    try:
        eng.register_adapter("slow", str(folders["all_r16"]))
        [image] = images.glob("*.img")
        [expected] = eng.generate([req("Tell me about the sea.", tokens=4, adapter="slow")])
        eng.register_adapter("other", str(folders["qv_r4"]))
        eng.generate([req(tokens=1, adapter="other")])  # one slot, host tier of 1: `slow` leaves both
        assert eng.cache.host_get("slow@1") is None and eng.cache.state_of("slow@1") == "REGISTERED"
        raw = image.read_bytes()
        image.unlink()
        os.mkfifo(image)
        feeder = threading.Thread(target=_feed_slowly, args=(image, raw))
        feeder.start()

        seen: list[tuple[int, float]] = []  # (engine step, time) of each chunk of the running request
        eng.start()
        running = eng.submit(req("Once upon a time", tokens=120),
                             listener=lambda chunk: seen.append((eng.steps_total, time.monotonic())))
        while len(seen) < 5:
            time.sleep(0.01)
        submitted = time.monotonic()
        [slow] = eng.generate([req("Tell me about the sea.", tokens=4, adapter="slow")], timeout=60)
        served = time.monotonic()
        feeder.join()
        running.cancel()
    finally:
        eng.stop()
    assert slow.token_ids == expected.token_ids and slow.adapter_versions == expected.adapter_versions
    assert served - submitted >= FEED_SECONDS * 0.8, "the load was not slow"
    during = [(step, at) for step, at in seen if submitted <= at <= served]
    assert len(during) >= 5, f"only {len(during)} tokens while the slow load ran"
    steps = [step for step, _ in seen][:-1]  # (the last chunk: the cancellation)
    assert max(b - a for a, b in zip(steps, steps[1:])) == 1, steps  # a token on every step, none skipped
    assert eng.cache.stats.loads >= 1 and eng.cache.stats.image_rebuilds == 0


def test_slot_packs_fill_in_one_copy_per_pool_and_read_like_write(smol_fp32, peft_adapters):
    """A pack's blocks are the pools' slot rows: fill + publish gives the same pools as the per-module write,
    and its module views are the prepared A and B (B transposed in the pack)."""
    from loraplex.server.adapters.loader import load_adapter

    _, folders = peft_adapters
    shapes = smol_fp32.model.group_shapes()
    weights = load_adapter(str(folders["all_r16"]), smol_fp32.arch, 32, "p")
    prepared = prepare_for_device(weights, torch.float32, pin=False)
    packed = pack_adapter(prepared, shapes, 32)
    assert {block.name for block in packed.pack.blocks} == {"qkv", "o", "gate_up", "down"}
    for key, m in prepared.modules.items():
        assert torch.equal(packed.modules[key].a, m.a) and torch.equal(packed.modules[key].b, m.b)
    by_fill = LoraStacks(shapes, 2, 32, torch.float32, "cpu")
    by_fill.fill(1, packed.pack)
    assert not by_fill.groups[(0, "qkv")].host_rank[:, 1].any()  # not readable until published
    by_fill.publish(1, packed.pack)
    by_write = LoraStacks(shapes, 2, 32, torch.float32, "cpu")
    by_write.write(1, AdapterWeights("p", dict(prepared.modules)))
    for key, g in by_fill.groups.items():
        w = by_write.groups[key]
        assert (g.host_rank == w.host_rank).all() and torch.equal(g.rank, w.rank)
        for j in range(g.num_slices):
            r = int(g.host_rank[j, 1])
            assert torch.equal(g.a_pool[j, 32:32 + r], w.a_pool[j, 32:32 + r])
            n0, n = g.slice_offsets[j], g.out_features[j]
            assert torch.equal(g.bt_pool[32:32 + r, n0:n0 + n], w.bt_pool[32:32 + r, n0:n0 + n])
    assert by_fill.slot_targets(1) == by_write.slot_targets(1)


def test_cpu_fills_land_at_once(smol_fp32, peft_adapters):
    from loraplex.server.adapters.loader import load_adapter

    _, folders = peft_adapters
    stacks = LoraStacks(smol_fp32.model.group_shapes(), 2, 32, torch.float32, "cpu")
    filler = SlotFiller(stacks, staging_bytes=1)
    weights = load_adapter(str(folders["qv_r4"]), smol_fp32.arch, 32, "q")
    packed = pack_adapter(prepare_for_device(weights, torch.float32, pin=False), stacks.shapes, 32)
    ticket = filler.start(0, packed.pack)
    assert ticket is not None and filler.landed(ticket) and filler.filling == 0
    assert filler.stream is None  # no side stream without CUDA


def test_staging_pool_is_bounded_and_reuses_buffers():
    pool = StagingPool(max_bytes=3 * GRANULE, pin=False)
    first = pool.take(GRANULE + 1)  # two granules
    assert first.numel() == 2 * GRANULE and pool.take(2 * GRANULE) is None  # only one granule left
    small = pool.take(10)
    assert small.numel() == GRANULE and pool.held_bytes == 3 * GRANULE
    pool.give_back(first)
    assert pool.take(GRANULE) is first  # the free buffer is lent again, nothing new is allocated
    pool.give_back(first)
    pool.give_back(small)
    big = pool.take(3 * GRANULE)  # the free buffers are too small: dropped to make room
    assert big.numel() == 3 * GRANULE and pool.held_bytes == 3 * GRANULE


def test_auto_slots_fit_free_memory_with_a_margin():
    per_slot = 40 << 20
    assert slots_that_fit(21 << 30, per_slot, 4 << 30, fewest=8, most=10_000) == (17 << 30) // per_slot
    assert slots_that_fit(21 << 30, per_slot, 4 << 30, fewest=8, most=64) == 64
    with pytest.raises(ResourceExhausted, match="fewer than the 8"):
        slots_that_fit(4 << 30, per_slot, 4 << 30, fewest=8, most=64)


def test_auto_max_loras_on_the_cpu_keeps_the_default(smol_fp32, tmp_path):
    from loraplex.server.config import CacheConfig, EngineConfig, ModelConfig
    from loraplex.server.engine.engine import Engine

    config = EngineConfig(model=ModelConfig(quantization="none", dtype="float32"),
                          lora=LoRAConfig(max_lora_rank=16, max_loras="auto", max_cpu_loras=16, derived_rank=16),
                          cache=CacheConfig(block_size=8, num_blocks=32), cache_dir=str(tmp_path / "cache"))
    eng = Engine(config, loaded=smol_fp32)
    try:
        assert eng.num_adapter_slots == 8 and eng.runner.lora_stacks.num_slots == 8
    finally:
        eng.stop()
    with pytest.raises(ConfigError, match="max_loras"):
        LoRAConfig(max_loras="many")
    with pytest.raises(ConfigError, match="max_adapters_per_request"):
        LoRAConfig(max_loras="auto", max_cpu_loras=4, max_adapters_per_request=8)
