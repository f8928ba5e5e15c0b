"""Slot fills on the GPU: one async copy per pool on a side stream, admission after the fill's event.

Run on the device: pytest -m gpu tests/engine/test_slot_fills_gpu.py

Both tests would fail if the pool copies ran on the compute stream or if a sequence were admitted before its
fill's event fired: the fills are held back behind a long `torch.cuda._sleep` queued on the filler's side
stream (a stand-in for a big, slow fill), so only a side-stream copy that admission waits for gives the
adapter's own tokens after many steps of the running request.
"""
from __future__ import annotations

import time

import pytest
import torch

from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.types import GenerationRequest, StoppingCriteria

pytestmark = pytest.mark.gpu

ADAPTERS = ("qv_r4", "all_r16", "mlp_r8_rslora", "ko_r32_patterns")


@pytest.fixture(scope="module")
def cuda_bf16(embedded_dir):
    from loraplex.server.model.loader import load_model

    return load_model(ModelConfig(path=str(embedded_dir), quantization="nf4", dtype="bfloat16", device="cuda"))


def make_engine(loaded, folders, tmp_path, max_loras):
    config = EngineConfig(
        model=ModelConfig(quantization="nf4", dtype="bfloat16", device="cuda"),
        lora=LoRAConfig(max_lora_rank=32, max_loras=max_loras, max_cpu_loras=8, max_adapters_per_request=1,
                        derived_rank=32),
        cache=CacheConfig(block_size=16, num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, overlap_steps=True),
        cache_dir=str(tmp_path / "cache"))
    engine = Engine(config, loaded=loaded)
    for name in ADAPTERS:
        engine.register_adapter(name, str(folders[name]))
    return engine


def ask(adapter: str | None, tokens: int = 8, prompt: str = "Tell me about the sea.") -> GenerationRequest:
    return GenerationRequest(prompt=prompt, adapter=adapter,
                             stopping=StoppingCriteria(max_new_tokens=tokens, ignore_eos=True))


def sleep_cycles(seconds: float) -> int:
    """GPU clock cycles of about `seconds` (torch.cuda._sleep spins for a number of cycles)."""
    rate_khz = torch.cuda.clock_rate() if hasattr(torch.cuda, "clock_rate") else 2_000_000
    return int(seconds * rate_khz * 1000)


def test_fills_run_on_a_side_stream_and_admission_waits_for_them(cuda_bf16, peft_adapters, tmp_path):
    """Each adapter's request, admitted right after its slot was filled (two slots, four adapters: every one
    evicts another), gives the tokens it gives alone with the adapter resident; while a held-back fill
    waits on the side stream the running request keeps decoding."""
    _, folders = peft_adapters
    resident = {}
    eng = make_engine(cuda_bf16, folders, tmp_path / "resident", max_loras=len(ADAPTERS))
    try:
        for name in ADAPTERS:
            eng.load_adapter(name)  # in a slot, landed
        for name in ADAPTERS:
            [resident[name]] = eng.generate([ask(name)])
    finally:
        eng.stop()

    eng = make_engine(cuda_bf16, folders, tmp_path / "cycling", max_loras=2)
    filler = eng.adapters.filler
    try:
        eng.start()
        for round_ in range(2):
            for name in ADAPTERS:
                seen: list[int] = []
                running = eng.submit(ask(None, tokens=400, prompt="Count from one to a thousand:"),
                                     listener=lambda chunk, seen=seen: seen.append(eng.steps_total))
                while len(seen) < 3:
                    time.sleep(0.001)
                if round_ == 0:  # hold the fill back behind 0.3 s of side-stream work
                    with torch.cuda.stream(filler.stream):
                        torch.cuda._sleep(sleep_cycles(0.3))
                before = len(seen)
                [got] = eng.generate([ask(name)], timeout=60)
                during = len(seen) - before
                running.cancel()
                assert got.token_ids == resident[name].token_ids, (round_, name)
                if round_ == 0:  # the running request decoded while the fill waited on the side stream
                    assert during >= 5, (name, during)
        assert eng.cache.stats.installs >= 2 * len(ADAPTERS) - 2
    finally:
        eng.stop()


def test_a_slow_fill_overlaps_decode_steps(cuda_bf16, peft_adapters, tmp_path):
    """A fill held 0.5 s on the side stream: decode steps go on at their pace (no step waits for it), and
    the adapter's request is admitted only after the fill's event, about 0.5 s later."""
    _, folders = peft_adapters
    eng = make_engine(cuda_bf16, folders, tmp_path, max_loras=2)
    filler = eng.adapters.filler
    try:
        eng.start()
        arrivals: list[float] = []
        running = eng.submit(ask(None, tokens=2000, prompt="Count from one to a thousand:"),
                             listener=lambda chunk: arrivals.append(time.monotonic()))
        while len(arrivals) < 20:
            time.sleep(0.001)
        with torch.cuda.stream(filler.stream):
            torch.cuda._sleep(sleep_cycles(0.5))
        started = time.monotonic()
        [got] = eng.generate([ask("all_r16", tokens=2)], timeout=60)
        waited = time.monotonic() - started
        running.cancel()
        window = [b - a for a, b in zip(arrivals, arrivals[1:]) if started <= a and b <= started + waited]
        before = [b - a for a, b in zip(arrivals[:20], arrivals[1:20])]
    finally:
        eng.stop()
    assert got.token_ids and waited >= 0.4, waited  # admitted only once the held-back fill had landed
    assert len(window) >= 10, len(window)  # decoding went on meanwhile
    assert max(window) < 0.25, sorted(window)[-3:]  # no step waited for the 0.5 s fill
    assert sorted(window)[len(window) // 2] <= 3 * sorted(before)[len(before) // 2] + 0.005
