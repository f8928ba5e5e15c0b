"""Engine behaviour on the real embedded model: validation, queueing, stops, sampling, adapters' lifecycle."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.errors import (AdapterMismatch, AdapterNotFound, InvalidAdapter, InvalidArgument,
                                    ResourceExhausted)
from loraplex.server.types import (AdapterWeight, ChatMessage, GenerationRequest, MergeMethod, SamplingParams,
                                   StopReason, StoppingCriteria)


def make_engine(loaded, tmp_path, max_loras=4, max_cpu_loras=8, max_waiting=64, **scheduler):
    config = EngineConfig(
        model=ModelConfig(quantization="none", dtype="float32"),
        lora=LoRAConfig(max_lora_rank=32, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                        max_adapters_per_request=min(3, max_loras), derived_rank=32),
        cache=CacheConfig(block_size=8, num_blocks=160),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128, max_waiting=max_waiting,
                                  max_new_tokens_limit=256, **scheduler),
        cache_dir=str(tmp_path / "cache"))
    return Engine(config, loaded=loaded)


def req(prompt="Hello, my name is", tokens=6, **kw):
    stopping = kw.pop("stopping", StoppingCriteria(max_new_tokens=tokens, ignore_eos=True))
    return GenerationRequest(prompt=prompt, stopping=stopping, **kw)


@pytest.fixture(scope="module")
def engine(smol_fp32, peft_adapters, tmp_path_factory):
    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path_factory.mktemp("engine"))
    for name, folder in folders.items():
        eng.register_adapter(name, str(folder))
    yield eng
    eng.stop()


# ---- bad input: clear errors naming the field, nothing queued ----

@pytest.mark.parametrize("request_kwargs, field", [
    (dict(sampling=SamplingParams(temperature=-1.0)), "sampling.temperature"),
    (dict(sampling=SamplingParams(temperature=float("nan"))), "sampling.temperature"),
    (dict(sampling=SamplingParams(top_p=0.0)), "sampling.top_p"),
    (dict(sampling=SamplingParams(top_p=1.5)), "sampling.top_p"),
    (dict(stopping=StoppingCriteria(max_new_tokens=100000)), "stopping.max_new_tokens"),
    (dict(prompt=""), "prompt"),
    (dict(adapter="qv_r4", adapters=(AdapterWeight("all_r16", 1.0),)), "adapters"),
    (dict(adapters=(AdapterWeight("qv_r4", float("nan")),)), "adapters[0].weight"),
    (dict(adapters=(AdapterWeight("qv_r4", float("inf")),)), "adapters[0].weight"),
    (dict(adapters=(AdapterWeight("qv_r4", 1.0),), merge_method=MergeMethod.TIES, density=0.0), "density"),
    (dict(top_logprobs=1000), "top_logprobs"),
    (dict(stopping=StoppingCriteria(max_new_tokens=4, stop_sequences=("",))), "stopping.stop_sequences"),
])
def test_bad_parameters_name_the_field(engine, request_kwargs, field):
    queued = engine.queue_depth()
    with pytest.raises(InvalidArgument) as info:
        engine.submit(req(**request_kwargs))
    assert info.value.field == field and field.split("[")[0].split(".")[-1] in str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"
    assert engine.queue_depth() == queued


def test_prompt_longer_than_the_context(engine):
    with pytest.raises(InvalidArgument, match="prompt") as info:
        engine.submit(GenerationRequest(prompt_token_ids=tuple([42] * engine.limits.max_model_len)))
    assert info.value.field == "prompt"


def test_unknown_adapter_is_not_found_and_named(engine):
    with pytest.raises(AdapterNotFound, match="'nope'") as info:
        engine.submit(req(adapter="nope"))
    assert info.value.code == "NOT_FOUND"
    with pytest.raises(AdapterNotFound, match="'missing'"):
        engine.submit(req(adapters=(AdapterWeight("qv_r4", 0.5), AdapterWeight("missing", 0.5))))


def test_queue_full_is_refused_at_once(smol_fp32, tmp_path):
    eng = make_engine(smol_fp32, tmp_path, max_waiting=3)
    handles = [eng.submit(req()) for _ in range(3)]
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match="queue full") as info:
        eng.submit(req())
    assert time.monotonic() - started < 0.5 and info.value.code == "RESOURCE_EXHAUSTED"
    while not all(h.done for h in handles):
        eng.step()
    assert eng.submit(req(tokens=1))  # room again once the queue drained
    eng.stop()


# ---- bad adapters: refused by name, nothing half-registered, the engine keeps serving ----

def _broken_copy(src, dst, mutate):
    shutil.copytree(src, dst)
    mutate(dst)
    return dst


def _nan_weights(folder):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _rank_too_high(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    grown = {}
    for key, t in tensors.items():  # rank 4 -> 40, over the engine's max_lora_rank of 32
        grown[key] = torch.cat([t] * 10, dim=0) if "lora_A" in key else torch.cat([t] * 10, dim=1)
    config["r"] = config["r"] * 10
    config["rank_pattern"] = {}
    save_file(grown, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _pickle_only(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


def _corrupt(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _dora(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _wrong_target(folder):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    renamed = {k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()}
    save_file(renamed, str(folder / "adapter_model.safetensors"))


def _other_base(folder):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    widened = {k: (torch.cat([v, v], dim=1) if "lora_A" in k else v) for k, v in tensors.items()}
    save_file(widened, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("mutate, error, words", [
    (_nan_weights, InvalidAdapter, "non-finite"),
    (_rank_too_high, AdapterMismatch, "max"),
    (_pickle_only, InvalidAdapter, "pickle"),
    (_corrupt, InvalidAdapter, "safetensors"),
    (_dora, InvalidAdapter, "DoRA"),
    (_wrong_target, AdapterMismatch, "qkv_proj"),
    (_other_base, AdapterMismatch, "shape"),
])
def test_bad_adapter_refused_nothing_half_loaded(engine, peft_adapters, tmp_path, mutate, error, words):
    _, folders = peft_adapters
    bad = _broken_copy(folders["qv_r4"], tmp_path / "bad", mutate)
    before = [e.key for e in engine.catalog.list()]
    host_before = engine.cache.resident_counts()
    with pytest.raises(error, match=words):
        engine.register_adapter("bad", str(bad))
    assert [e.key for e in engine.catalog.list()] == before
    assert engine.cache.resident_counts() == host_before
    with pytest.raises(AdapterNotFound):
        engine.submit(req(adapter="bad"))
    [ok] = engine.generate([req(adapter="qv_r4", tokens=2)])  # still serving
    assert ok.stop_reason is StopReason.MAX_TOKENS


# ---- text, stops, streaming, sampling ----

def test_streaming_chunks_add_up_to_the_result(engine):
    handle = engine.submit(req(messages=(ChatMessage("user", "Name three colors."),), prompt=None, tokens=12))
    chunks = []
    while not handle.done:
        engine.step()
    chunks = list(handle)
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert sum(len(c.token_ids) for c in chunks) == 12
    [again] = engine.generate([req(messages=(ChatMessage("user", "Name three colors."),), prompt=None,
                                   tokens=12)])
    assert "".join(c.text for c in chunks) == again.text
    assert again.text == engine.tokenizer.decode(again.token_ids, skip_special_tokens=True)


def test_stop_sequence_across_tokens_and_eos(engine):
    [free] = engine.generate([req("Count: 1, 2, 3, 4,", tokens=16)])
    assert len(free.text) > 8
    stop = free.text[3:7]  # a stop string that starts mid-output and may span tokens
    [stopped] = engine.generate([req("Count: 1, 2, 3, 4,", stopping=StoppingCriteria(
        max_new_tokens=16, stop_sequences=(stop,), ignore_eos=True))])
    assert stopped.stop_reason is StopReason.STOP_SEQUENCE
    assert stopped.text == free.text[:free.text.index(stop)]
    [eos] = engine.generate([GenerationRequest(messages=(ChatMessage("user", "Say hi."),),
                                               stopping=StoppingCriteria(max_new_tokens=200))])
    assert eos.stop_reason is StopReason.EOS_TOKEN and eos.token_ids[-1] in engine.eos_token_ids


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    sampled = dict(sampling=SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234), tokens=10)
    [alone] = engine.generate([req(**sampled)])
    crowd = engine.generate([req("Other prompt", tokens=7), req(**sampled), req("x", adapter="qv_r4")])
    assert crowd[1].token_ids == alone.token_ids and crowd[1].seed == 1234
    [other_seed] = engine.generate([req(**{**sampled, "sampling": SamplingParams(temperature=1.0, seed=99)})])
    assert other_seed.token_ids != alone.token_ids
    [unseeded] = engine.generate([req(sampling=SamplingParams(temperature=1.0), tokens=4)])
    assert unseeded.seed != 0  # a random seed is chosen and reported back


def test_top_logprobs(engine):
    [r] = engine.generate([req(top_logprobs=3, tokens=4)])
    assert len(r.logprobs) == 4
    for token, lp in zip(r.token_ids, r.logprobs):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][0] == token  # greedy: the chosen token is the most likely
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and abs(lp.logprob - lp.top[0][1]) < 1e-5


# ---- cancellation, deadlines ----

def test_deadline_stops_generation_and_frees_blocks(engine):
    available = engine.block_manager.num_available_blocks
    handle = engine.submit(req(tokens=200, deadline=time.monotonic() + 0.3))
    while not handle.done:
        engine.step()
    result = handle.result()
    assert result.stop_reason is StopReason.CANCELLED and result.error.code == "DEADLINE_EXCEEDED"
    assert 0 < result.generated_tokens < 200
    assert engine.block_manager.num_available_blocks == available


def test_cancel_while_waiting(smol_fp32, tmp_path):
    eng = make_engine(smol_fp32, tmp_path)
    handle = eng.submit(req())
    handle.cancel()
    eng.step()
    assert handle.result(timeout=1).stop_reason is StopReason.CANCELLED
    assert eng.block_manager.num_available_blocks == eng.block_manager.capacity
    eng.stop()


# ---- adapters' lifecycle ----

def test_new_version_while_running_keeps_the_old_for_running_requests(smol_fp32, peft_adapters, tmp_path):
    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path)
    eng.register_adapter("live", str(folders["qv_r4"]))
    [v1_alone] = eng.generate([req(adapter="live", tokens=10)])
    running = eng.submit(req(adapter="live", tokens=10))
    for _ in range(3):
        eng.step()
    entry = eng.register_adapter("live", str(folders["all_r16"]))
    assert entry.version == 2
    newer = eng.submit(req(adapter="live", tokens=10))
    while not (running.done and newer.done):
        eng.step()
    old, new = running.result(), newer.result()
    assert old.adapter_versions == {"live": 1} and old.token_ids == v1_alone.token_ids
    assert new.adapter_versions == {"live": 2} and new.token_ids != v1_alone.token_ids
    eng.stop()


def test_delete_while_running_finishes_normally(smol_fp32, peft_adapters, tmp_path):
    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path)
    eng.register_adapter("gone", str(folders["mlp_r8_rslora"]))
    [alone] = eng.generate([req(adapter="gone", tokens=8)])
    handle = eng.submit(req(adapter="gone", tokens=8))
    eng.step()
    eng.delete_adapter("gone")
    with pytest.raises(AdapterNotFound):
        eng.submit(req(adapter="gone"))
    while not handle.done:
        eng.step()
    assert handle.result().token_ids == alone.token_ids
    eng.step()
    assert eng.cache.state_of("gone@1") == "REGISTERED"  # its slot and host copy are gone
    eng.stop()


def test_disk_reload_runs_off_the_engine_thread_and_never_stalls_others(smol_fp32, peft_adapters, tmp_path):
    """Host tier of 1: using B pushes A out of memory; A's next use reloads it from disk on the
    loader thread while a running request keeps decoding one token per step."""
    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path, max_loras=1, max_cpu_loras=1)
    eng.register_adapter("a", str(folders["qv_r4"]))
    [a_alone] = eng.generate([req(adapter="a", tokens=6)])
    eng.register_adapter("b", str(folders["ko_r32_patterns"]))
    eng.generate([req(adapter="b", tokens=1)])  # b takes the only slot; a, now unslotted, leaves the host tier
    running = eng.submit(req(tokens=40))
    eng.step()
    eng.step()
    assert eng.cache.host_get("a@1") is None  # evicted from host: needs a disk load
    waiting = eng.submit(req(adapter="a", tokens=6))
    tokens_before = len(eng.scheduler.running[0].output_ids)
    steps = 0
    while not waiting.done:
        produced = len(running_seq.output_ids) if (running_seq := next(
            (s for s in eng.scheduler.running if s.handle is running), None)) else None
        eng.step()
        steps += 1
        if produced is not None and not running.done:
            assert len(running_seq.output_ids) == produced + 1  # the running request never skipped a step
    assert waiting.result().token_ids == a_alone.token_ids
    assert eng.cache.stats.loads >= 1 and steps > 0 and tokens_before >= 1
    running.cancel()
    eng.step()
    eng.stop()


def test_pinned_adapter_is_never_evicted(smol_fp32, peft_adapters, tmp_path):
    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path, max_loras=4)
    eng.register_adapter("pinned", str(folders["qv_r4"]), pin=True)
    others = {"all_r16": "all_r16", "mlp_r8_rslora": "mlp_r8_rslora", "ko_r32_patterns": "ko_r32_patterns",
              "copy": "all_r16"}
    for name, folder in others.items():
        eng.register_adapter(name, str(folders[folder]))
    assert eng.cache.state_of("pinned@1") == "DEVICE"
    for name in [*others, "all_r16", "copy"]:  # 4 adapters cycle through the 3 unpinned slots
        eng.generate([req(adapter=name, tokens=2)])
        assert eng.cache.state_of("pinned@1") == "DEVICE"
    assert eng.cache.stats.evictions >= 2
    eng.stop()


def test_ties_mix_built_once_and_reused(engine):
    mix = dict(adapters=(AdapterWeight("qv_r4", 0.6), AdapterWeight("ko_r32_patterns", 0.4)),
               merge_method=MergeMethod.TIES, density=0.5, merge_seed=3)
    [first] = engine.generate([req(**mix)])
    loads = engine.cache.stats.loads
    [second] = engine.generate([req(**mix)])
    assert first.token_ids == second.token_ids and engine.cache.stats.loads == loads
    [report] = [r for key, r in engine.mix_reports.items()]
    assert 0 <= report.max_rel_error < 1 and report.num_modules == 4 * engine.arch.num_layers
    [dare] = engine.generate([req(**{**mix, "merge_method": MergeMethod.DARE_LINEAR})])
    [linear] = engine.generate([req(adapters=mix["adapters"])])
    assert len({tuple(first.token_ids), tuple(dare.token_ids), tuple(linear.token_ids)}) >= 2


def test_engine_thread_serves_concurrent_submitters(smol_fp32, peft_adapters, tmp_path):
    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path)
    for name in ("qv_r4", "all_r16"):
        eng.register_adapter(name, str(folders[name]))
    plan = [("Hi there", ""), ("The sky is", "qv_r4"), ("def f(x):", "all_r16"), ("Paris", "qv_r4")] * 2
    expected = eng.generate([req(p, adapter=a) for p, a in plan])
    eng.start()
    results = [None] * len(plan)

    def client(i):
        results[i] = eng.submit(req(plan[i][0], adapter=plan[i][1])).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    eng.stop()
    assert eng.block_manager.num_available_blocks == eng.block_manager.capacity


def test_a_mix_that_pins_leave_no_room_for_fails_fast(smol_fp32, peft_adapters, tmp_path):
    """Pins keep one slot free; a mix needing more unpinned slots than exist fails at once (never
    waits forever), and unpinning makes it runnable."""
    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path, max_loras=3)
    names = list(folders)
    for name in names:
        eng.register_adapter(name, str(folders[name]), pin=True)
    assert sum(eng.cache.state_of(f"{n}@1") == "DEVICE" for n in names) == 2  # the last slot stays unpinned
    pinned = [n for n in names if eng.cache.state_of(f"{n}@1") == "DEVICE"]
    free = [n for n in names if n not in pinned]
    mix = dict(adapters=tuple(AdapterWeight(n, 0.5) for n in free), tokens=2)
    [failed] = eng.generate([req(**mix)])
    assert failed.stop_reason is StopReason.ERROR and failed.error.code == "RESOURCE_EXHAUSTED"
    [uses_pinned] = eng.generate([req(adapters=(AdapterWeight(pinned[0], 0.5), AdapterWeight(free[0], 0.5)),
                                      tokens=2)])
    assert uses_pinned.stop_reason is StopReason.MAX_TOKENS
    eng.pin_adapter(pinned[0], False)
    [ok] = eng.generate([req(**mix)])
    assert ok.stop_reason is StopReason.MAX_TOKENS
    eng.stop()


# ---- overlapped steps: step n+1 launched before step n's tokens are read ----

def test_overlapped_steps_give_the_same_results(smol_fp32, peft_adapters, tmp_path):
    """With overlap the next step decodes tokens it has not seen on the host (gathered on the device), and
    sequences that stop (EOS, stop string, max tokens) while a step is in flight drop that step's token:
    every result equals the lockstep engine's, chunk for chunk."""
    _, folders = peft_adapters
    results = {}
    for overlap in (False, True):
        eng = make_engine(smol_fp32, tmp_path / str(overlap), overlap_steps=overlap)
        for name in ("qv_r4", "all_r16"):
            eng.register_adapter(name, str(folders[name]))
        requests = [
            req("The three primary colors are", tokens=12, adapter="qv_r4"),
            req("Once upon a time, in a small village,", tokens=5),
            req("Write a haiku about the sea.", tokens=16, adapter="all_r16",
                stopping=StoppingCriteria(max_new_tokens=16, stop_sequences=(" the",))),
            req("def fibonacci(n):", stopping=StoppingCriteria(max_new_tokens=20)),  # may stop at EOS
            req("Paris is the capital of", tokens=9,
                adapters=(AdapterWeight("qv_r4", 0.5), AdapterWeight("all_r16", 0.5))),
            req("Q: What is 12 times 7?\nA:" * 6, tokens=7, adapter="all_r16"),  # prefill over several steps
        ]
        handles = [eng.submit(r) for r in requests]
        while not all(h.done for h in handles):
            eng.step()
        results[overlap] = [list(h) for h in handles]
        assert not eng.has_work() and eng.block_manager.num_available_blocks == eng.block_manager.capacity
        assert sum(eng.cache.slot_refs()) == 0
        eng.stop()
    for lockstep, overlapped in zip(results[False], results[True]):
        assert [(c.text, c.token_ids, c.stop_reason) for c in overlapped] == \
            [(c.text, c.token_ids, c.stop_reason) for c in lockstep]
    assert {chunks[-1].stop_reason for chunks in results[True]} >= {StopReason.MAX_TOKENS, StopReason.STOP_SEQUENCE}


def _evict_a_from_host(eng) -> None:
    eng.generate([req(adapter="b", tokens=1)])  # host tier of 1: b in, a out
    assert eng.cache.host_get("a@1") is None


def test_host_misses_read_the_prepared_image_and_rebuild_a_damaged_one(smol_fp32, peft_adapters, tmp_path):
    """Registration writes each version's prepared image; a host miss reads it (no folder validation); a
    damaged image is detected, rebuilt from the folder and never served; a deleted version's image goes."""
    from loraplex.server.adapters.prepared_image import read_image

    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path, max_loras=1, max_cpu_loras=1)
    try:
        eng.register_adapter("a", str(folders["qv_r4"]))
        eng.register_adapter("b", str(folders["ko_r32_patterns"]))
        images = sorted((tmp_path / "cache" / "adapter-images").glob("*.img"))
        assert len(images) == 2
        [a_first] = eng.generate([req(adapter="a", tokens=6)])
        _evict_a_from_host(eng)
        shutil.rmtree(folders["qv_r4"].parent / "moved", ignore_errors=True)
        moved = shutil.copytree(folders["qv_r4"], folders["qv_r4"].parent / "moved")
        shutil.rmtree(folders["qv_r4"])  # the folder is gone: only the image can serve this miss
        try:
            loads = eng.cache.stats.loads
            [a_image] = eng.generate([req(adapter="a", tokens=6)])
            assert a_image.token_ids == a_first.token_ids and eng.cache.stats.loads == loads + 1
            assert eng.cache.stats.image_rebuilds == 0
        finally:
            shutil.copytree(moved, folders["qv_r4"])
            shutil.rmtree(moved)
        for image in images:  # damage both images' data: each is rebuilt at its next miss, never served
            raw = bytearray(image.read_bytes())
            raw[-3] ^= 0x10
            image.write_bytes(bytes(raw))
        _evict_a_from_host(eng)  # b's miss
        [a_rebuilt] = eng.generate([req(adapter="a", tokens=6)])  # a's miss
        assert a_rebuilt.token_ids == a_first.token_ids and eng.cache.stats.image_rebuilds == 2
        assert all(_readable(read_image, p) for p in images)  # both rewritten whole
        eng.delete_adapter("a")
        assert len(list((tmp_path / "cache" / "adapter-images").glob("*.img"))) == 1
    finally:
        eng.stop()


def _readable(read_image, path) -> bool:
    try:
        read_image(path, path.stem)
        return True
    except Exception:  # noqa: BLE001 - damaged: not readable
        return False


def test_host_tier_bounded_in_bytes(smol_fp32, peft_adapters, tmp_path):
    """max_cpu_lora_bytes bounds the host tier beside the count: registrations past it push the least recently
    used copies out, whose next use reloads them (from their prepared images)."""
    import dataclasses

    _, folders = peft_adapters
    eng = make_engine(smol_fp32, tmp_path, max_loras=1, max_cpu_loras=8)
    eng.register_adapter("probe", str(folders["qv_r4"]))
    one = eng.cache.resident_bytes()["host"]
    eng.stop()
    limit = 2 * one + 1
    config = dataclasses.replace(eng.config, lora=dataclasses.replace(eng.config.lora, max_cpu_lora_bytes=limit))
    eng = Engine(config, loaded=smol_fp32)
    try:
        for i in range(3):
            eng.register_adapter(f"x{i}", str(folders["qv_r4"]))
        assert eng.cache.resident_counts()["host"] == 2 and eng.cache.resident_bytes()["host"] <= limit
        assert eng.cache.host_get("x0@1") is None  # the oldest went
        [result] = eng.generate([req(adapter="x0", tokens=3)])
        assert len(result.token_ids) == 3 and eng.cache.resident_bytes()["host"] <= limit
    finally:
        eng.stop()
