"""The Generation service on an in-process server: streaming, cancellation and KV, queueing, health,
draining, metrics. (The Required-behaviour rows through reflection: test_outside_client.py.)"""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.client import Client, ClientConfig
from loraplex.server.config import ServiceConfig
from loraplex.server.service.metrics import AdapterLabels
from loraplex.v1 import generation_pb2 as gpb

from .conftest import PROMPTS, ServerThread, chat_request, engine_config_for_tests, register_examples, wait_for

NAMES = ("caps", "pirate", "caps_soft", "pirate_soft")


def request(prompt=PROMPTS[0], tokens=8, **fields):
    return chat_request(prompt, stopping=gpb.StoppingCriteria(max_new_tokens=tokens, ignore_eos=True), **fields)


@pytest.fixture(scope="module")
def server(smol_fp32, adapter_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("generation")
    service = ServiceConfig(port=0, metrics_port=0, state_dir=str(base / "state"), adapter_roots=(str(adapter_root),),
                            max_adapter_labels=3)
    running = ServerThread(service, engine_config_for_tests(base / "cache"), smol_fp32)
    register_examples(running.target, NAMES)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(ClientConfig(target=server.target, timeout=120)) as c:
        yield c


def idle(engine) -> bool:
    return engine.queue_depth() == 0 and engine.running_batch_size() == 0 and engine.kv_usage() == 0


def test_stream_adds_up_to_generate(client):
    whole = client.stubs.generation.Generate(request(adapter="pirate", tokens=12, request_id="abc"))
    parts = list(client.stubs.generation.GenerateStream(request(adapter="pirate", tokens=12)))
    assert [p.stop_reason for p in parts[:-1]] == [gpb.NOT_FINISHED] * (len(parts) - 1)
    assert parts[-1].stop_reason == whole.stop_reason == gpb.MAX_TOKENS
    assert "".join(p.text for p in parts) == whole.text and [t for p in parts for t in p.token_ids] == list(
        whole.token_ids)
    assert whole.request_id == "abc" and parts[0].request_id and whole.adapter_version == "pirate@1"
    assert dict(whole.adapter_versions) == {"pirate": 1} and whole.generated_tokens == 12 and whole.input_tokens > 5


def test_sampling_seed_logprobs_and_stops(client):
    sampled = dict(sampling=gpb.SamplingParameters(temperature=1.0, top_p=0.9, seed=42), top_logprobs=2)
    first = client.stubs.generation.Generate(request(tokens=6, **sampled))
    again = client.stubs.generation.Generate(request(tokens=6, **sampled))
    assert first.token_ids == again.token_ids and first.seed == 42 and len(first.logprobs) == 6
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in first.logprobs)
    unseeded = client.stubs.generation.Generate(request(tokens=2, sampling=gpb.SamplingParameters(temperature=1.0)))
    assert unseeded.seed != 0
    free = client.stubs.generation.Generate(request(tokens=16))
    stop = free.text[4:8]
    stopped = client.stubs.generation.Generate(chat_request(PROMPTS[0], stopping=gpb.StoppingCriteria(
        max_new_tokens=16, stop_sequences=[stop], ignore_eos=True)))
    assert stopped.stop_reason == gpb.STOP_SEQUENCE and stopped.text == free.text[:free.text.index(stop)]


def test_merge_method_and_density_reach_the_engine(client):
    """density only matters to TIES / DARE: 0 is refused for TIES and ignored for LINEAR (the engine
    tests build TIES / DARE mixes; building one here would only repeat them)."""
    mix = [gpb.AdapterWeight(name="caps", weight=0.6), gpb.AdapterWeight(name="pirate", weight=0.4)]
    for method in (gpb.TIES, gpb.DARE_LINEAR, gpb.DARE_TIES):
        with pytest.raises(grpc.RpcError) as info:
            client.stubs.generation.Generate(request(tokens=4, adapters=mix, merge_method=method, density=0.0))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "density" in info.value.details()
    linear = client.stubs.generation.Generate(request(tokens=4, adapters=mix, density=0.0))
    assert linear.generated_tokens == 4 and linear.adapter_version == "caps@1,pirate@1"


def test_tokenize_and_model_info(client, server):
    tokenizer = server.engine.tokenizer
    reply = client.stubs.generation.Tokenize(gpb.TokenizeRequest(text="Hello world", return_tokens=True))
    assert list(reply.token_ids) == tokenizer("Hello world").input_ids and len(reply.tokens) == len(reply.token_ids)
    chat = client.stubs.generation.Tokenize(gpb.TokenizeRequest(messages=request().messages))
    assert len(chat.token_ids) > len(reply.token_ids) and not chat.tokens
    with pytest.raises(grpc.RpcError) as info:
        client.stubs.generation.Tokenize(gpb.TokenizeRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text" in info.value.details()
    model = client.stubs.generation.ModelInfo(gpb.ModelInfoRequest())
    assert (model.base_model, model.quantization, model.device, model.dtype) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "none", "cpu", "float32")
    assert (model.max_context, model.max_lora_rank, model.adapter_slots, model.max_new_tokens_limit) == (512, 16, 4, 64)


def test_cancel_stops_within_a_step_and_frees_kv(client, server):
    engine = server.engine
    stream = client.stubs.generation.GenerateStream(request(tokens=64))
    next(stream), next(stream)
    assert engine.kv_usage() > 0 and engine.running_batch_size() == 1
    steps = engine.steps_total
    stream.cancel()
    assert wait_for(lambda: idle(engine), 5)
    # The engine drops a cancelled request at its next step (tests/engine); here the cancel also has to
    # cross the network and the event loop, so allow a few steps, far fewer than the 62 tokens left.
    assert engine.steps_total - steps <= 5
    assert engine.block_manager.num_free_blocks == engine.block_manager.capacity


def test_deadline_reaches_the_engine(client, server):
    engine = server.engine
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        client.stubs.generation.Generate(request(tokens=64), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 2
    assert wait_for(lambda: idle(engine), 5)
    stream = client.stubs.generation.GenerateStream(request(tokens=64), timeout=0.4)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: idle(engine), 5)


def test_metrics_series_labels_and_cap(client, server):
    before = server.metrics()
    for unknown in ("missing-1", "missing-2", "missing-3"):  # NOT_FOUND: counted as "other", takes no label
        with pytest.raises(grpc.RpcError):
            client.stubs.generation.Generate(request(tokens=2, adapter=unknown))
    for name in NAMES:  # max_adapter_labels=3: the fourth distinct name is counted as "other"
        client.stubs.generation.Generate(request(tokens=2, adapter=name))
    client.stubs.generation.Generate(request(tokens=2, adapters=[gpb.AdapterWeight(name="caps", weight=0.5)]))
    with pytest.raises(grpc.RpcError):
        client.stubs.generation.Generate(request(tokens=2, adapter="missing"))
    assert wait_for(lambda: idle(server.engine), 5)
    m = server.metrics()
    labels = {key.split('adapter="')[1].split('"')[0] for key in m if key.startswith("loraplex_requests_total{")}
    assert labels <= {"base", "mix", "other", *NAMES[:3]} and {"mix", "other"} <= labels
    assert len(labels & set(NAMES)) == 3  # unknown names did not use up the cap
    assert m['loraplex_requests_total{adapter="other",code="NOT_FOUND"}'] >= 1
    mix_tokens = 'loraplex_generated_tokens_total{adapter="mix"}'
    assert m[mix_tokens] - before.get(mix_tokens, 0) == 2
    assert m['loraplex_time_to_first_token_seconds_count{adapter="caps"}'] >= 1
    assert m['loraplex_time_per_output_token_seconds_count{adapter="caps"}'] >= 1
    gauges = ("loraplex_queue_depth", "loraplex_running_batch_size", "loraplex_kv_cache_usage_ratio")
    assert [m[g] for g in gauges] == [0, 0, 0]
    assert m["loraplex_adapters_registered"] == 4 and m['loraplex_adapters_resident{tier="device"}'] >= 1
    assert "loraplex_adapter_cache_misses_total" in m and "loraplex_adapter_load_seconds_count" in m
    assert "loraplex_adapter_cache_evictions_total" in m and "loraplex_adapter_cache_hits_total" in m


def test_adapter_labels_are_bounded():
    labels = AdapterLabels(cap=2)
    assert [labels(n) for n in ("a", "b", "c", "a", "")] == ["a", "b", "other", "a", "base"]
    assert labels("c", mixed=True) == "mix"


def test_queue_full_and_cancel_while_waiting(smol_fp32, tmp_path):
    server = ServerThread(ServiceConfig(port=0, metrics_port=None, state_dir=str(tmp_path / "state")),
                          engine_config_for_tests(tmp_path / "cache", max_num_seqs=1, max_waiting=2), smol_fp32)
    try:
        with Client(ClientConfig(target=server.target, timeout=60)) as client:
            running = client.stubs.generation.GenerateStream(request(tokens=64))
            next(running)
            waiting = [client.stubs.generation.GenerateStream(request(tokens=4)) for _ in range(2)]
            assert wait_for(lambda: server.engine.queue_depth() == 2, 5)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                client.stubs.generation.Generate(request(tokens=4))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 0.5
            assert "queue full" in info.value.details()
            for call in waiting:
                call.cancel()
            assert wait_for(lambda: server.engine.queue_depth() == 0, 5)
            running.cancel()
            assert wait_for(lambda: idle(server.engine), 5)
            assert client.stubs.generation.Generate(request(tokens=2)).generated_tokens == 2  # room again
    finally:
        server.stop()


def test_health_loading_serving_and_draining(smol_fp32, tmp_path):
    server = ServerThread(ServiceConfig(port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                                        grace_seconds=30), engine_config_for_tests(tmp_path / "cache"), smol_fp32,
                          load=False)
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    status = lambda service="": health.Check(health_pb2.HealthCheckRequest(service=service)).status  # noqa: E731
    try:
        assert status() == status("loraplex.v1.Generation") == health_pb2.HealthCheckResponse.NOT_SERVING
        with Client(ClientConfig(target=server.target, timeout=30)) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.stubs.generation.Generate(request())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
            server.run(server.server.load())
            assert status() == status("loraplex.v1.Adapters") == health_pb2.HealthCheckResponse.SERVING
            in_flight = client.stubs.generation.GenerateStream(request(tokens=24))
            next(in_flight)
            stopper = threading.Thread(target=server.stop, kwargs=dict(grace=30))
            stopper.start()
            assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
            with pytest.raises(grpc.RpcError) as info:
                client.stubs.generation.Generate(request())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(in_flight)  # running work finishes within the grace period
            assert rest[-1].stop_reason == gpb.MAX_TOKENS and rest[-1].generated_tokens == 24
            stopper.join(30)
            assert not stopper.is_alive()
    finally:
        channel.close()
        if server.thread.is_alive():
            server.stop()


def test_drain_past_grace_ends_streams_unavailable(smol_fp32, tmp_path):
    """Issue 12 #8: a stream cut by the grace period ends UNAVAILABLE (retryable) with a message saying the
    server is shutting down, never CANCELLED, which a client could take for its own cancel; its last
    message still says how far it got."""
    server = ServerThread(ServiceConfig(port=0, metrics_port=None, state_dir=str(tmp_path / "state")),
                          engine_config_for_tests(tmp_path / "cache"), smol_fp32)
    with Client(ClientConfig(target=server.target, timeout=30)) as client:
        stream = client.stubs.generation.GenerateStream(request(tokens=64))
        unary = client.stubs.generation.Generate.future(request(tokens=64))
        next(stream)
        engine = server.engine
        server.stop(grace=0.2)
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for message in stream:
                received.append(message)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "shutting down" in info.value.details() and "retry" in info.value.details()
        assert received[-1].stop_reason == gpb.CANCELLED and received[-1].generated_tokens < 64
        with pytest.raises(grpc.RpcError) as info:
            unary.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
        assert engine.block_manager.num_free_blocks == engine.block_manager.capacity
