"""Issue 12: hostile input and faults, each numbered failure reproduced against a real in-process server
(the embedded model, real files, real gRPC on 127.0.0.1) and shown handled.

 1 a 15 MB prompt / Tokenize stalled everyone        6 a registered source of any size was copied
 2 a long prefill held short requests (8k prompt)    7 config and tensors could disagree; other bases
 3 undecodable requests gave UNKNOWN                 8 shutdown cut streams CANCELLED (test_generation)
 4 unknown enum values were served                   9 deleted files stayed; messages showed state paths
 5 deeply nested adapter_config.json gave INTERNAL
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from safetensors.torch import save_file

from loraplex.client import Client, ClientConfig, LoraplexClientError
from loraplex.server.config import ServiceConfig
from loraplex.server.errors import ResourceExhausted
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import generation_pb2 as gpb

from .conftest import EXAMPLES, ServerThread, chat_request, engine_config_for_tests, wait_for

FIFTEEN_MB = 15_000_000


def request(prompt="Name a color.", tokens=4, **fields):
    return chat_request(prompt, stopping=gpb.StoppingCriteria(max_new_tokens=tokens, ignore_eos=True), **fields)


def register(client, request: apb.RegisterAdapterRequest, **kwargs):
    return client.stubs.adapters.RegisterAdapter(request, **kwargs)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def client_error(call) -> LoraplexClientError:
    """What a typed loraplex.client call raised."""
    with pytest.raises(LoraplexClientError) as info:
        call()
    return info.value


def timed(call):
    started = time.monotonic()
    try:
        return call(), time.monotonic() - started
    except grpc.RpcError as exc:
        return exc, time.monotonic() - started


def caps_copy(dst: Path, **config_updates) -> Path:
    shutil.copytree(EXAMPLES / "caps", dst)
    if config_updates:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_updates}))
    return dst


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory) -> Path:
    """Adapter folders for items 5-7, inside the server's adapter root."""
    root = tmp_path_factory.mktemp("hostile-root")
    caps_copy(root / "caps")
    caps_copy(root / "pirate_like", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    caps_copy(root / "foo_targets", target_modules=["foo_proj"])
    caps_copy(root / "redos", target_modules="(.*)*x")
    deep = caps_copy(root / "deep")
    (deep / "adapter_config.json").write_text("[" * 100_000)
    sparse = caps_copy(root / "sparse")
    with open(sparse / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(3 << 30)  # 3 GB apparent size, no blocks on disk
    # A valid rank-16 adapter on every projection in float64: ~39 MB, the most this server takes.
    big = root / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=16, lora_alpha=16, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])))
    shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(30):
        for module, (n_in, n_out) in shapes.items():
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(16, n_in, generator=gen, dtype=torch.float64) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, 16, generator=gen, dtype=torch.float64) * 0.01
    save_file(tensors, str(big / "adapter_model.safetensors"))
    return root


@pytest.fixture(scope="module")
def server(smol_fp32, hostile_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    service = ServiceConfig(port=0, metrics_port=None, state_dir=str(base / "state"),
                            adapter_roots=(str(hostile_root),), max_upload_bytes=64 << 20, min_free_disk_bytes=0)
    running = ServerThread(service, engine_config_for_tests(base / "cache"), smol_fp32)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(ClientConfig(target=server.target, timeout=120)) as c:
        yield c


@pytest.fixture(scope="module")
def state(server) -> Path:
    return Path(server.server.config.state_dir)


def state_files(state: Path) -> list[str]:
    return sorted(p.relative_to(state).as_posix() for p in state.rglob("*") if p.name != "registry.json")


def health_check(client) -> float:
    started = time.monotonic()
    reply = client.stubs.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


# ---- 1: bounded input, tokenizing off the event loop ---------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's resident memory (server and clients: the server runs in-process)."""

    def __init__(self):
        self.baseline = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_15mb_prompt_refused_at_once_while_others_answer_in_normal_time(client, server):
    _, alone = timed(lambda: client.stubs.generation.Generate(request(tokens=4)))
    health_alone = max(health_check(client) for _ in range(3))
    huge = gpb.GenerateRequest(prompt="a" * FIFTEEN_MB, stopping=gpb.StoppingCriteria(max_new_tokens=4))
    with ThreadPoolExecutor(4) as pool:
        refused = pool.submit(timed, lambda: client.stubs.generation.Generate(huge))
        short = pool.submit(timed, lambda: client.stubs.generation.Generate(request(tokens=4)))
        health = [health_check(client) for _ in range(10)]
        error, seconds = refused.result()
        reply, short_seconds = short.result()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and seconds < 1.0, (error, seconds)
    assert error.details().startswith("prompt: 15000000 bytes"), error.details()
    assert reply.generated_tokens == 4 and short_seconds < 3 * alone + 0.5, (short_seconds, alone)
    assert max(health) < max(0.25, 5 * health_alone), health  # was: health checks timed out


def test_a_burst_of_15mb_generates_and_tokenizes_is_refused_in_bounded_time_and_memory(client, server):
    """Six 15 MB messages at once (issue: four such Tokenize calls took 42 s and 5.6 GB). grpc.aio itself
    spends ~50 ms of event-loop time receiving each (a bare grpc.aio server shows the same), so health
    answers within a second here, not in its usual milliseconds."""
    with ThreadPoolExecutor(8) as pool, PeakRss() as memory:
        started = time.monotonic()
        huge = [pool.submit(timed, lambda: next(client.stubs.generation.GenerateStream(gpb.GenerateRequest(
            prompt="a" * FIFTEEN_MB)))) for _ in range(2)]
        tokenize = [pool.submit(timed, lambda: client.stubs.generation.Tokenize(gpb.TokenizeRequest(
            text="é" * (FIFTEEN_MB // 2)))) for _ in range(4)]
        health = [health_check(client) for _ in range(10)]
        results = [future.result() for future in huge + tokenize]
        took = time.monotonic() - started
    for error, _ in results:
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert results[0][0].details().startswith("prompt:") and results[-1][0].details().startswith("text:")
    assert took < 3.0 and max(health) < 1.0, (took, health)
    # Six 15 MB messages held by clients and server at once: a few hundred MB, not the GBs tokenizing took.
    assert memory.peak - memory.baseline < 1 << 30, (memory.peak - memory.baseline) >> 20


def test_prompt_just_under_the_byte_bound_is_tokenized_off_the_loop(client, server):
    bound = server.engine.limits.max_prompt_bytes
    assert bound == 512 * 81  # max_model_len x the longest SmolLM2 token (81 bytes)
    text = "word " * (bound // 5 - 1)  # fits the byte bound, but ~8k tokens: refused after tokenizing
    with ThreadPoolExecutor(4) as pool:
        refused = [pool.submit(timed, lambda: client.stubs.generation.Generate(gpb.GenerateRequest(prompt=text)))
                   for _ in range(3)]
        health = [health_check(client) for _ in range(5)]
        for future in refused:
            error, _ = future.result()
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens leave no room" in error.details()
    assert max(health) < 0.5, health
    counted = client.stubs.generation.Tokenize(gpb.TokenizeRequest(text=text))
    assert len(counted.token_ids) > 512  # Tokenize is bounded by bytes, not by the context


def test_worker_pool_refuses_past_its_queue_and_hands_orphans_over():
    from loraplex.server.service.workers import WorkerPool

    pool = WorkerPool(workers=1, max_pending=2)
    release, orphans = threading.Event(), []

    async def scenario():
        first = asyncio.create_task(pool.run(release.wait))
        second = asyncio.create_task(pool.run(lambda: "second", on_orphan=orphans.append))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="server busy"):
            await pool.run(lambda: None)
        second.cancel()  # its caller goes away while it waits: the result goes to on_orphan
        release.set()
        assert await first is True
        await asyncio.sleep(0.2)
        assert pool.pending == 0 and await pool.run(lambda: 3) == 3
    asyncio.run(scenario())
    pool.close()
    assert orphans == ["second"]


# ---- 2: fair scheduling --------------------------------------------------------------------------------

def test_short_request_beside_an_8k_prompt_done_within_a_few_steps(smol_fp32, tmp_path):
    config = engine_config_for_tests(tmp_path / "cache", max_num_batched_tokens=512)
    config = type(config)(model=type(config.model)(quantization="none", dtype="float32", max_model_len=8192),
                          lora=config.lora, cache=type(config.cache)(block_size=16, num_blocks=560),
                          scheduler=config.scheduler, cache_dir=config.cache_dir)
    server = ServerThread(ServiceConfig(port=0, metrics_port=None, state_dir=str(tmp_path / "state")), config,
                          smol_fp32)
    engine = server.engine
    try:
        with Client(ClientConfig(target=server.target, timeout=300)) as client:
            long = client.stubs.generation.GenerateStream(gpb.GenerateRequest(
                prompt="word " * 8100, stopping=gpb.StoppingCriteria(max_new_tokens=4, ignore_eos=True)))
            assert wait_for(lambda: engine.running_batch_size() == 1 and engine.steps_total >= 1, 60)
            steps, started = engine.steps_total, time.monotonic()
            reply = client.stubs.generation.Generate(request(tokens=4))
            took_steps, took_seconds = engine.steps_total - steps, time.monotonic() - started
            assert reply.generated_tokens == 4
            assert engine.running_batch_size() == 1  # the long prompt is still being prefilled beside it
            print(f"short request beside an 8k-token prompt: {took_steps} steps, {took_seconds:.2f} s")
            assert took_steps <= 7, took_steps  # its prompt, 3 more decodes, and the step it arrived in
            long.cancel()
            assert wait_for(lambda: engine.kv_usage() == 0, 30)
    finally:
        server.stop()


# ---- 3, 4: undecodable requests, unknown enum values -------------------------------------------------

def _raw(channel, method: str, streaming_request: bool = False, streaming_response: bool = False):
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (streaming_request, streaming_response)]
    return kind(method, request_serializer=None, response_deserializer=None)


BAD_UTF8_PROMPT = b"\x32\x02\xff\xfe"  # field 6 (prompt), 2 bytes, not UTF-8
BAD_UTF8_CONTENT = b"\x3a\x0c\x0a\x0a\x0a\x04user\x12\x02\xc3\x28"  # messages.messages[0].content


@pytest.mark.parametrize("data, words", [
    (BAD_UTF8_PROMPT, ["prompt", "UTF-8"]),
    (BAD_UTF8_CONTENT, ["messages.messages[0].content", "UTF-8"]),
    (b"\x0b" * 20, ["cannot be decoded"]),
    (b"\x32\x7f" + b"x" * 3, ["prompt", "runs past the end"]),
    (b"\x4a\x05\x08", ["stopping", "runs past the end"]),
])
def test_undecodable_generate_is_invalid_argument_naming_the_field(server, data, words):
    with grpc.insecure_channel(server.target) as channel:
        for streaming in (False, True):
            call = _raw(channel, "/loraplex.v1.Generation/" + ("GenerateStream" if streaming else "Generate"),
                        streaming_response=streaming)
            error = rpc_error(lambda: list(call(data, timeout=10)) if streaming else call(data, timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert all(w in error.details() for w in words), error.details()


def test_undecodable_bytes_on_every_kind_of_method(server):
    with grpc.insecure_channel(server.target) as channel:
        cases = [("/loraplex.v1.Generation/Tokenize", False, False),
                 ("/loraplex.v1.Adapters/RegisterAdapter", False, False),
                 ("/loraplex.v1.Adapters/UploadAdapter", True, False),
                 ("/grpc.health.v1.Health/Check", False, False),
                 ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True, True)]
        for method, streaming_request, streaming_response in cases:
            call = _raw(channel, method, streaming_request, streaming_response)
            data = iter([b"\x0a\x01\xff"]) if streaming_request else b"\x0a\x01\xff"
            error = rpc_error(lambda: list(call(data, timeout=10)) if streaming_response else call(data, timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
        upload = _raw(channel, "/loraplex.v1.Adapters/UploadAdapter", True)
        good_then_bad = iter([apb.UploadAdapterRequest(name="x").SerializeToString(), b"\x22\x02\xff\xff"])
        error = rpc_error(lambda: upload(good_then_bad, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "file_name" in error.details()
    assert not list((Path(server.server.config.state_dir) / "tmp").iterdir())


@pytest.mark.parametrize("value", [99, -5, 4])
def test_unknown_merge_method_is_refused(client, value):
    mix = [gpb.AdapterWeight(name="caps", weight=1.0)]
    error = rpc_error(lambda: client.stubs.generation.Generate(request(adapters=mix, merge_method=value)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "merge_method" in error.details() and str(value) in error.details()


# ---- 5: JSON with depth and size limits, time-bounded patterns -----------------------------------------

def _upload(client, name: str, config: bytes, weights: bytes):
    messages = [apb.UploadAdapterRequest(name=name),
                apb.UploadAdapterRequest(file_name="adapter_config.json", data=config)]
    messages += [apb.UploadAdapterRequest(file_name="adapter_model.safetensors", data=weights[i:i + (1 << 20)])
                 for i in range(0, len(weights), 1 << 20)]
    return client.stubs.adapters.UploadAdapter(iter(messages))


def test_deeply_nested_config_refused_through_register_and_upload(client, state):
    before = state_files(state)
    error = rpc_error(lambda: register(client, apb.RegisterAdapterRequest(name="deep", source="deep")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "nests 100000 levels" in error.details()
    weights = (EXAMPLES / "caps" / "adapter_model.safetensors").read_bytes()
    for config in (b"[" * 100_000, b'{"r": ' * 50_000, b" " * (2 << 20)):
        error = rpc_error(lambda: _upload(client, "deep", config, weights))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter_config.json" in error.details()
    assert state_files(state) == before


def test_regex_targets_that_never_finish_are_cut_short(client, state):
    started = time.monotonic()
    error = rpc_error(lambda: register(client, apb.RegisterAdapterRequest(name="r", source="redos")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "target_modules" in error.details()
    assert time.monotonic() - started < 10  # Python's re takes minutes on "(.*)*x", holding the GIL
    health_check(client)


# ---- 6: registered sources checked before copying ------------------------------------------------------

def test_3gb_sparse_source_refused_in_seconds_state_dir_unchanged(client, state):
    before = state_files(state)
    started = time.monotonic()
    error = rpc_error(lambda: register(client, apb.RegisterAdapterRequest(name="sp", source="sparse")))
    assert time.monotonic() - started < 3
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "3221225472 bytes" in error.details()
    assert "nothing was copied" in error.details()
    assert state_files(state) == before


def test_oversized_upload_refused_as_the_bytes_arrive(client, state):
    before = state_files(state)
    config = (EXAMPLES / "pirate" / "adapter_config.json").read_bytes()  # q/k/v/o (caps is on all linear layers)
    error = rpc_error(lambda: _upload(client, "fat", config, b"\0" * (12 << 20)))  # pirate is at most ~8.4 MB
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "valid adapter" in error.details()
    assert state_files(state) == before


def test_full_disk_is_refused_before_copying(client, server, state):
    registry = server.server.runtime.registry
    before = state_files(state)
    registry.min_free_disk_bytes = shutil.disk_usage(state).free + (1 << 40)  # as if the disk were full
    try:
        error = rpc_error(lambda: register(client, apb.RegisterAdapterRequest(name="c", source="caps")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "free" in error.details()
        error = client_error(lambda: client.upload_adapter("c", EXAMPLES / "caps"))
        assert error.status == grpc.StatusCode.RESOURCE_EXHAUSTED and "free" in error.message
        assert str(state) not in error.message
    finally:
        registry.min_free_disk_bytes = 0
    assert state_files(state) == before


def test_registration_stops_when_the_client_goes_away(client, state):
    before = state_files(state)
    error = rpc_error(lambda: register(client, apb.RegisterAdapterRequest(name="big", source="big"), timeout=0.05))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(3)  # before: the copy, the checks and the registration all went on for nobody
    assert "big" not in [a.name for a in client.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters]
    assert state_files(state) == before
    info = client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="big", source="big")).adapter
    assert info.rank == 16 and len(info.target_modules) == 7  # the same source is fine given time
    client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name="big"))


# ---- 7: config must agree with tensors; other bases reported or refused --------------------------------

def test_config_targets_must_agree_with_the_tensors(client, state):
    before = state_files(state)
    error = rpc_error(lambda: client.stubs.adapters.RegisterAdapter(
        apb.RegisterAdapterRequest(name="f", source="foo_targets")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "foo_proj" in error.details() and "disagree" in error.details()
    assert state_files(state) == before


def test_another_base_is_reported_or_refused_under_strict_base(client, server, state):
    info = client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="other", source="pirate_like")).adapter
    assert len(info.warnings) == 1 and "meta-llama/Llama-3.2-1B" in info.warnings[0]
    listed = {a.name: a for a in client.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    assert list(listed["other"].warnings) == list(info.warnings)
    clean = client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="clean", source="caps")).adapter
    assert not clean.warnings
    registry = server.server.runtime.registry
    registry.strict_base = True  # what `loraplex serve --strict-base` sets (test_serve_flags)
    try:
        before = state_files(state)
        error = rpc_error(lambda: client.stubs.adapters.RegisterAdapter(
            apb.RegisterAdapterRequest(name="other2", source="pirate_like")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "strict-base" in error.details()
        assert state_files(state) == before
    finally:
        registry.strict_base = False
    for name in ("other", "clean"):
        client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name=name))


def test_serve_flags_reach_the_configs():
    from loraplex.server.cli import build_parser

    def configs(argv):
        args = build_parser().parse_args(["serve", "--device", "cpu", *argv])
        args._layers.resolve(args, {}, {})
        return configs_from_args(args)

    from loraplex.server.service.serve_cmd import configs_from_args

    service, engine = configs(["--strict-base", "--min-free-disk-bytes", "7", "--request-workers", "3",
                               "--max-pending-requests", "9", "--long-prefill-token-threshold", "32",
                               "--max-message-bytes", str(4 << 20)])
    assert (service.strict_base, service.min_free_disk_bytes, service.request_workers,
            service.max_pending_requests, service.max_message_bytes) == (True, 7, 3, 9, 4 << 20)
    assert engine.scheduler.long_prefill_token_threshold == 32 and engine.scheduler.prefill_chunk_cap == 32
    service, engine = configs([])
    assert (service.strict_base, service.min_free_disk_bytes, service.request_workers) == (False, 256 << 20, 2)
    assert engine.scheduler.prefill_chunk_cap == 512 // 4


# ---- 9: deleted files removed once unused; no state-dir paths in messages ------------------------------

def test_deleted_and_replaced_versions_files_go_once_unused(client, server, state):
    client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="temp", source="caps"))
    v1 = state / "adapters" / "temp" / "v1"
    stream = client.stubs.generation.GenerateStream(request(tokens=40, adapter="temp"))
    next(stream)
    client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="temp", source="pirate_like"))  # v2
    v2 = state / "adapters" / "temp" / "v2"
    client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name="temp"))
    time.sleep(2.5)  # past the settle time and a few sweeps: v1 is still used by the stream
    assert v1.is_dir() and not v2.exists()
    rest = list(stream)
    assert rest[-1].stop_reason == gpb.MAX_TOKENS and rest[-1].adapter_version == "temp@1"
    assert wait_for(lambda: not v1.exists(), 10)
    assert wait_for(lambda: not (state / "adapters" / "temp").exists(), 5)


def test_messages_never_show_the_state_dir(client, server, state, hostile_root, tmp_path):
    corrupt = caps_copy(hostile_root / "corrupt_weights")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    details = []
    error = rpc_error(lambda: client.stubs.adapters.RegisterAdapter(
        apb.RegisterAdapterRequest(name="cw", source="corrupt_weights")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and str(corrupt) in error.details()  # the caller's path
    details.append(error.details())
    error = client_error(lambda: client.upload_adapter("cw", corrupt))
    assert error.status == grpc.StatusCode.INVALID_ARGUMENT and "adapter_model.safetensors" in error.message
    details.append(error.message)
    bad_base = caps_copy(hostile_root / "cw_target")
    (bad_base / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["x"]}))
    details.append(client_error(lambda: client.upload_adapter("cw", bad_base)).message)
    client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="gone", source="caps"))
    deleted = client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name="gone")).adapter
    assert deleted.source == str(hostile_root / "caps")
    details.append(deleted.source)
    for text in details:
        assert str(state) not in text and os.path.realpath(state) not in text and "/tmp/" not in text.replace(
            str(hostile_root), ""), text
