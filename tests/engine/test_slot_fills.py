"""Adapter loads and slot fills never hold up the running batch (CPU, the real engine on the embedded model).

The slow source is the adapter's prepared image replaced by a named pipe that a thread feeds in small chunks
over about 1.5 s: the host miss really waits on it, on the loader thread."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from loraplex.server.adapters.cache import SlotWait
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


# ---- the GPU's fill path on the CPU (LoRAConfig.staged_fills): fills land a step or more after they start ----

def _staged_engine(loaded, tmp_path, num_slots: int, staging_bytes: int = 1, max_cpu_loras: int | None = None):
    """staging_bytes=1: the pool holds one slot of max_lora_rank (its floor), so fills run one or two at a time."""
    from loraplex.server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from loraplex.server.engine.engine import Engine

    config = EngineConfig(
        model=ModelConfig(quantization="none", dtype="float32"),
        lora=LoRAConfig(max_lora_rank=16, max_loras=num_slots, max_cpu_loras=max_cpu_loras or num_slots,
                        max_adapters_per_request=1,
                        derived_rank=16, staged_fills=True, staging_bytes=staging_bytes),
        cache=CacheConfig(block_size=8, num_blocks=160),
        scheduler=SchedulerConfig(max_num_seqs=num_slots, max_num_batched_tokens=256, max_new_tokens_limit=256),
        cache_dir=str(tmp_path / "cache"))
    return Engine(config, loaded=loaded)


def _step_inline(eng, handles) -> tuple[int, int]:
    """Step like the bench until `handles` are done: (step calls that ran work, idle step calls)."""
    busy = idle = 0
    while not all(h.done for h in handles):
        if eng.step():
            busy += 1
        else:
            idle += 1
            eng.wait_for_work()
    return busy, idle


def test_staged_fills_on_the_cpu_take_the_gpu_path(smol_fp32, peft_adapters, tmp_path):
    """With staged fills a slot fill does not land in the step that starts it: the sequence waits (SKIP) while
    the staging thread copies, and its tokens are its adapter's, as with plain CPU fills."""
    _, folders = peft_adapters
    eng = _staged_engine(smol_fp32, tmp_path, num_slots=2)
    try:
        assert eng.adapters.filler.asynchronous and eng.adapters.filler.stream is None
        eng.register_adapter("a", str(folders["all_r16"]))
        [staged] = eng.generate([req("Tell me about the sea.", tokens=4, adapter="a")])
        assert eng.cache.stats.installs == 1 and eng.adapters.filler.filling == 0
        assert eng.cache.state_of("a@1") == "DEVICE"
    finally:
        eng.stop()
    plain = make_engine(smol_fp32, tmp_path / "plain", max_loras=2)
    try:
        plain.register_adapter("a", str(folders["all_r16"]))
        [expected] = plain.generate([req("Tell me about the sea.", tokens=4, adapter="a")])
    finally:
        plain.stop()
    assert staged.token_ids == expected.token_ids


def test_resident_adapters_need_no_fill_and_are_admitted_together(smol_fp32, peft_adapters, tmp_path):
    """The bench's flow: a warm-up over N distinct adapters, then the same N again. The second batch finds all N
    resident (no fill, no staging), is admitted whole in its first step and takes exactly `tokens` steps, like a
    base-model batch; the warm-up, whose fills land a few at a time, admitted its rows in several steps."""
    _, folders = peft_adapters
    n, tokens = 6, 3
    eng = _staged_engine(smol_fp32, tmp_path, num_slots=n)
    try:
        for i in range(n):
            eng.register_adapter(f"a{i}", str(folders["qv_r4" if i % 2 else "all_r16"]))
        batch = [req(f"Request {i} says", tokens=tokens, adapter=f"a{i}") for i in range(n)]
        steps = eng.steps_total
        handles = [eng.submit(r) for r in batch]
        _step_inline(eng, handles)
        warm_steps = eng.steps_total - steps
        assert eng.cache.stats.installs == n
        assert warm_steps > tokens, "the warm-up's fills all landed at once: the test does not stage them"
        assert sorted(eng.cache.resident_keys()["device"]) == sorted(f"a{i}@1" for i in range(n))

        installs, waits = eng.cache.stats.installs, eng.cache.stats.staging_waits
        shapes = set(eng.runner.step_shapes)
        steps = eng.steps_total
        handles = [eng.submit(r) for r in batch]
        busy, idle = _step_inline(eng, handles)
        assert eng.cache.stats.installs == installs and eng.cache.stats.staging_waits == waits
        assert eng.adapters.filler.filling == 0
        assert eng.steps_total - steps == tokens and idle == 0  # admitted together: prefill + (tokens - 1) decodes
        # the whole batch's prefill and decode: shapes the trickling warm-up never ran (on a GPU: compiles, and
        # a decode graph captured, inside this batch's TTFT; bench.serving.run_one warms up again for them)
        assert {kind for kind, _, _ in eng.runner.step_shapes - shapes} == {"prefill", "decode"}
    finally:
        eng.stop()


def test_cold_fills_admit_within_bounded_steps_without_spinning(smol_fp32, peft_adapters, tmp_path):
    """N cold adapters, nothing else running, a staging pool of about one slot: every request is admitted once
    its fill lands, in a bounded number of engine steps, and the loop sleeps (wait_for_work) rather than spins
    while the staging thread copies: idle steps stay a small multiple of the fills."""
    _, folders = peft_adapters
    n, tokens = 6, 2
    eng = _staged_engine(smol_fp32, tmp_path, num_slots=n)
    try:
        for i in range(n):
            eng.register_adapter(f"a{i}", str(folders["all_r16"]))
        started = time.monotonic()
        handles = [eng.submit(req(f"Request {i} says", tokens=tokens, adapter=f"a{i}")) for i in range(n)]
        busy, idle = _step_inline(eng, handles)
        elapsed = time.monotonic() - started
        results = [h.result(1) for h in handles]
    finally:
        eng.stop()
    assert all(len(r.token_ids) == tokens for r in results)
    assert eng.cache.stats.installs == n and eng.cache.stats.staging_waits > 0  # the pool did bound the fills
    assert busy <= n * tokens + 2, busy  # at worst one admission per fill, each running its own steps
    assert idle <= 3 * n, f"{idle} idle steps for {n} fills: the loop spins instead of waiting for the fills"
    assert elapsed < 30, elapsed


def test_a_fill_without_staging_room_evicts_nothing(smol_fp32, peft_adapters, tmp_path):
    """All slots hold idle adapters and every staging buffer is lent: installing another adapter fails and
    leaves every resident adapter in its slot (it used to evict the LRU one first)."""
    _, folders = peft_adapters
    eng = _staged_engine(smol_fp32, tmp_path, num_slots=2, max_cpu_loras=4)
    try:
        for name in ("a", "b", "c"):
            eng.register_adapter(name, str(folders["all_r16"]))
        eng.generate([req(tokens=1, adapter="a"), req(tokens=1, adapter="b")])
        assert sorted(eng.cache.resident_keys()["device"]) == ["a@1", "b@1"]
        pool = eng.adapters.filler.staging
        lent = []
        while (buffer := pool.take(1)) is not None:
            lent.append(buffer)
        evictions = eng.cache.stats.evictions
        assert eng.run_on_engine_thread(lambda: eng.cache.acquire(["c@1"])) is SlotWait.STAGING
        assert eng.cache.stats.evictions == evictions
        assert sorted(eng.cache.resident_keys()["device"]) == ["a@1", "b@1"]
        for buffer in lent:
            pool.give_back(buffer)
        [done] = eng.generate([req(tokens=1, adapter="c")])
        assert done.token_ids and eng.cache.state_of("c@1") == "DEVICE"
    finally:
        eng.stop()


def test_bench_warm_up_runs_every_shape_of_the_timed_batch(embedded_dir):
    """bench serve's distinct row: with fills staged as on a GPU, one warm-up admits its rows a few at a time
    and never runs the full batch's prefill; run_one warms up until nothing needed a fill, so its timed batch
    runs no fill and no step shape for the first time (the 3.8 s TTFT of issue 13's first GPU run: the batch-32
    LoRA prefill's compiles and decode graph capture fell into the timed batch)."""
    from loraplex.server.bench.serving import ServeBenchConfig, build_engine, run_one

    n = 6
    cfg = ServeBenchConfig(model=str(embedded_dir), quantization="none", dtype="float32", device="cpu",
                           batches=(n,), modes=("distinct",), prompt_len=16, new_tokens=4, rank=4, num_adapters=n,
                           staged_fills=True, staging_bytes=1)
    engine = build_engine(cfg)
    try:
        row = run_one(engine, cfg, n, "distinct")
        warm_up_installs = engine.cache.stats.installs
    finally:
        engine.stop()
    assert warm_up_installs == n and engine.cache.stats.staging_waits > 0
    assert row["timed_fills"] == 0 and row["timed_new_shapes"] == 0, row
    assert row["steps"] == cfg.new_tokens and row["ttft_ms_max"] - row["ttft_ms_mean"] < 1.0, row


def test_a_request_waiting_for_staging_room_does_not_hold_back_resident_adapters(smol_fp32, peft_adapters,
                                                                               tmp_path):
    """Staging room for one fill: A's fill takes it, B's must wait for it; C, whose adapter is resident, is
    admitted in the very first step instead of queueing behind B (a staging wait skips, a slot shortage blocks)."""
    _, folders = peft_adapters
    eng = _staged_engine(smol_fp32, tmp_path, num_slots=3)
    try:
        for name in ("a", "b", "r"):
            eng.register_adapter(name, str(folders["all_r16"]))
        eng.generate([req(tokens=1, adapter="r")])
        assert eng.cache.state_of("r@1") == "DEVICE"
        waits = eng.cache.stats.staging_waits
        handles = [eng.submit(req(f"Request {n} says", tokens=2, adapter=n)) for n in ("a", "b", "r")]
        assert eng.step(), "the first step admitted nothing: C queued behind B's staging wait"
        assert eng.cache.stats.staging_waits > waits  # B did wait for staging room
        assert eng.adapters.filler.filling == 1  # A's fill only
        _step_inline(eng, handles)
        results = [h.result(1) for h in handles]
    finally:
        eng.stop()
    assert all(len(r.token_ids) == 2 for r in results)
