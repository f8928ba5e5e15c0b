"""Property-based tests (hypothesis) against a real in-process server, keeping issue 12 fixed:

- arbitrary GenerateRequest messages never give UNKNOWN or INTERNAL, and leave the engine idle;
- arbitrary or mutated bytes on the wire, to every method, never give UNKNOWN or INTERNAL;
- mutated adapter folders (adapter_config.json, the safetensors header, its data, its length), uploaded
  or registered, are served (when a mutation happens to leave a valid adapter) or refused with
  INVALID_ARGUMENT / FAILED_PRECONDITION and a message, and never leave anything behind.

Bounded for CI (LORAPLEX_FUZZ_EXAMPLES scales every test's example count; see README "Tests").
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loraplex.client import Client, ClientConfig
from loraplex.server.config import ServiceConfig
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import generation_pb2 as gpb

from .conftest import EXAMPLES, ServerThread, engine_config_for_tests, wait_for

SCALE = float(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "1"))
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-root")
    shutil.copytree(EXAMPLES / "caps", root / "caps")
    return root


@pytest.fixture(scope="module")
def server(smol_fp32, fuzz_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    service = ServiceConfig(port=0, metrics_port=None, state_dir=str(base / "state"), adapter_roots=(str(fuzz_root),),
                            max_upload_bytes=8 << 20, min_free_disk_bytes=0)
    running = ServerThread(service, engine_config_for_tests(base / "cache", max_new_tokens_limit=8,
                                                            default_max_new_tokens=4), smol_fp32)
    with Client(ClientConfig(target=running.target, timeout=60)) as client:
        client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="caps", source="caps"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(ClientConfig(target=server.target, timeout=60)) as c:
        yield c


def assert_healthy(client, server) -> None:
    reply = client.stubs.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    engine = server.engine
    assert wait_for(lambda: engine.queue_depth() == 0 and engine.running_batch_size() == 0
                    and engine.kv_usage() == 0, 30)


# ---- arbitrary GenerateRequest messages ---------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
names = st.sampled_from(["", "caps", "nope", "a" * 70, "caps@1", "../x"]) | texts
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def generate_requests(draw) -> gpb.GenerateRequest:
    """Mostly valid (so that many reach the engine and generate), each field hostile now and then."""
    def pick(valid, hostile):
        return draw(valid if draw(st.integers(0, 9)) < 8 else hostile)

    message = gpb.GenerateRequest(
        adapter=pick(st.sampled_from(["", "", "caps"]), names),
        merge_method=pick(st.just(0), st.integers(-3, 6)), merge_seed=draw(st.integers(0, 2**64 - 1)),
        request_id=pick(st.just(""), texts),
        top_logprobs=pick(st.sampled_from([0, 2]), st.sampled_from([21, 2**32 - 1])))
    if not message.adapter and draw(st.integers(0, 9)) < 2:
        for _ in range(draw(st.integers(1, 3))):
            message.adapters.add(name=pick(st.just("caps"), names), weight=pick(st.floats(-2, 2), floats))
    if draw(st.integers(0, 9)) < 1:
        message.density = draw(floats)
    which = pick(st.sampled_from(["prompt", "messages"]), st.just("none"))
    if which == "prompt":
        message.prompt = pick(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40), texts)
    elif which == "messages":
        message.messages.SetInParent()
        for _ in range(pick(st.integers(1, 3), st.just(0))):
            message.messages.messages.add(role=pick(st.sampled_from(["user", "system", "assistant"]),
                                                    st.sampled_from(["x", ""]) | texts), content=draw(texts))
    sampling = message.sampling
    for field, valid, value in (("temperature", st.floats(0, 2), floats), ("top_p", st.floats(0.01, 1), floats),
                                ("repetition_penalty", st.floats(0.5, 2), floats),
                                ("seed", st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))):
        if draw(st.booleans()):
            setattr(sampling, field, pick(valid, value))
    sampling.top_k = pick(st.sampled_from([0, 1, 50]), st.just(2**32 - 1))
    stopping = message.stopping
    stopping.max_new_tokens = pick(st.sampled_from([0, 1, 3, 8]), st.sampled_from([9, 2**32 - 1]))
    stopping.stop_sequences.extend(pick(st.lists(texts.filter(bool), max_size=2), st.lists(texts, max_size=20)))
    stopping.ignore_eos = draw(st.booleans())
    return message


@fuzz_settings(60)
@given(message=generate_requests(), streaming=st.booleans())
def test_arbitrary_generate_requests_never_unknown_or_internal(client, server, message, streaming):
    try:
        if streaming:
            replies = list(client.stubs.generation.GenerateStream(message))
            assert replies and replies[-1].stop_reason != gpb.NOT_FINISHED
        else:
            reply = client.stubs.generation.Generate(message)
            assert reply.stop_reason != gpb.NOT_FINISHED
        event("served")
    except grpc.RpcError as exc:
        event(exc.code().name)
        assert exc.code() not in NEVER, (exc.code(), exc.details())
        assert exc.details()


def test_arbitrary_generate_requests_left_the_server_idle(client, server):
    assert_healthy(client, server)


# ---- arbitrary bytes on the wire ----------------------------------------------------------------------

METHODS = [  # (method, streaming request, streaming response)
    ("/loraplex.v1.Generation/Generate", False, False), ("/loraplex.v1.Generation/GenerateStream", False, True),
    ("/loraplex.v1.Generation/Tokenize", False, False), ("/loraplex.v1.Generation/ModelInfo", False, False),
    ("/loraplex.v1.Adapters/RegisterAdapter", False, False), ("/loraplex.v1.Adapters/UploadAdapter", True, False),
    ("/loraplex.v1.Adapters/GetAdapter", False, False), ("/loraplex.v1.Adapters/LoadAdapter", False, False),
    ("/loraplex.v1.Adapters/ListAdapters", False, False), ("/grpc.health.v1.Health/Check", False, False),
]
VALID = gpb.GenerateRequest(prompt="Hello", adapter="caps", stopping=gpb.StoppingCriteria(
    max_new_tokens=2, stop_sequences=["x"]), sampling=gpb.SamplingParameters(temperature=0.5, seed=3)
                            ).SerializeToString()


@st.composite
def mutated(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


wire_bytes = st.binary(max_size=200) | mutated(VALID)


@fuzz_settings(80)
@given(method=st.sampled_from(METHODS), data=wire_bytes, more=st.lists(wire_bytes, max_size=2))
def test_arbitrary_bytes_never_unknown_or_internal(server, method, data, more):
    name, streaming_request, streaming_response = method
    with grpc.insecure_channel(server.target) as channel:
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary}[(streaming_request, streaming_response)]
        call = kind(name, request_serializer=None, response_deserializer=None)
        payload = iter([data, *more]) if streaming_request else data
        try:
            result = call(payload, timeout=60)
            if streaming_response:
                list(result)
            event("answered")
        except grpc.RpcError as exc:
            event(exc.code().name)
            assert exc.code() not in NEVER, (name, exc.code(), exc.details())
    assert not list((Path(server.server.config.state_dir) / "tmp").iterdir())


def test_arbitrary_bytes_left_the_server_idle(client, server):
    assert_healthy(client, server)
    names = [a.name for a in client.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters]
    assert "caps" in names


# ---- mutated adapter folders --------------------------------------------------------------------------

def small_adapter() -> tuple[bytes, bytes]:
    """A valid rank-2 adapter on q_proj and v_proj of layers 0-1 (a few KB: cheap to mutate and send)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for module, n_out in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(2, 576, generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, 2, generator=gen) * 0.01
    config = dict(peft_type="LORA", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                  base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", layers_to_transform=[0, 1])
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"loraplex-fuzz-{os.getpid()}.safetensors"
    save_file(tensors, str(path))
    weights = path.read_bytes()
    path.unlink()
    return json.dumps(config).encode(), weights


CONFIG, WEIGHTS = small_adapter()
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | floats | texts,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=12)
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "peft_type", "use_dora",
               "layers_to_transform", "base_model_name_or_path", "use_rslora", "bias", "init_lora_weights",
               "modules_to_save", "fan_in_fan_out"]


@st.composite
def mutated_config(draw) -> bytes:
    config = json.loads(CONFIG)
    how = draw(st.sampled_from(["set", "delete", "bytes", "nest", "regex"]))
    if how == "set":
        config[draw(st.sampled_from(CONFIG_KEYS) | texts)] = draw(json_values)
    elif how == "delete":
        config.pop(draw(st.sampled_from(sorted(config))))
    elif how == "bytes":
        return draw(mutated(CONFIG) | st.binary(max_size=100))
    elif how == "nest":
        depth = draw(st.integers(10, 5000))
        config[draw(st.sampled_from(CONFIG_KEYS))] = json.loads("[" * depth + "]" * depth) if depth < 500 else None
        if depth >= 500:
            return json.dumps(config).encode().replace(b"null", b"[" * depth + b"]" * depth, 1)
    else:
        config[draw(st.sampled_from(["target_modules", "rank_pattern"]))] = draw(st.sampled_from(
            ["(.*)*x", "(a|a)*$", ".*", "q_proj", "[", {"(.*)*q_proj": 2}, {"v_proj": 0}, {"(": 1}]))
    return json.dumps(config, allow_nan=True).encode()


@st.composite
def mutated_weights(draw) -> bytes:
    (header_len,) = struct.unpack("<Q", WEIGHTS[:8])
    header = json.loads(WEIGHTS[8:8 + header_len])
    data = WEIGHTS[8 + header_len:]
    how = draw(st.sampled_from(["header_field", "header_bytes", "data_bytes", "length", "cut", "extra_tensor"]))
    if how == "header_field":
        key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = draw(st.sampled_from(["F64", "I8", "BOOL", "F16", "xx"]) if field == "dtype" else
                                  st.lists(st.integers(-1, 2**40), max_size=3))
    elif how == "extra_tensor":
        header[draw(texts)] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
        data += b"\0\0\0\0"
    if how in ("header_field", "extra_tensor"):
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data
    if how == "header_bytes":
        return WEIGHTS[:8] + draw(mutated(WEIGHTS[8:8 + header_len])) + data
    if how == "data_bytes":  # may well stay a valid adapter (then it is served), or hold NaN / inf
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return WEIGHTS[:8 + header_len] + bytes(data)
    if how == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + WEIGHTS[8:]
    return WEIGHTS[:draw(st.integers(0, len(WEIGHTS) - 1))]


adapter_files = st.one_of(st.tuples(mutated_config(), st.just(WEIGHTS)),
                          st.tuples(st.just(CONFIG), mutated_weights()),
                          st.tuples(mutated_config(), mutated_weights()))


def _left_behind(state: Path, registered: set[str]) -> list[str]:
    staging = [p.name for p in (state / "tmp").iterdir()]
    folders = [p.name for p in (state / "adapters").iterdir() if p.name not in registered]
    return staging + folders


def test_the_unmutated_small_adapter_is_valid(client, server, fuzz_root):
    folder = fuzz_root / "small"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_bytes(CONFIG)
    (folder / "adapter_model.safetensors").write_bytes(WEIGHTS)
    info = client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="small", source="small")).adapter
    assert (info.rank, sorted(info.target_modules), list(info.warnings)) == (2, ["q_proj", "v_proj"], [])
    client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name="small"))
    state = Path(server.server.config.state_dir)
    assert wait_for(lambda: not (state / "adapters" / "small").exists(), 10)


@fuzz_settings(50)
@given(files=adapter_files, via_upload=st.booleans())
def test_mutated_adapter_folders_refused_clearly_and_nothing_left(client, server, fuzz_root, files, via_upload):
    config, weights = files
    state = Path(server.server.config.state_dir)
    if via_upload:
        messages = [apb.UploadAdapterRequest(name="mut"),
                    apb.UploadAdapterRequest(file_name="adapter_config.json", data=config),
                    apb.UploadAdapterRequest(file_name="adapter_model.safetensors", data=weights)]
        call = lambda: client.stubs.adapters.UploadAdapter(iter(messages))  # noqa: E731
    else:
        folder = fuzz_root / "mut"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        register = client.stubs.adapters.RegisterAdapter
        call = lambda: register(apb.RegisterAdapterRequest(name="mut", source="mut"))  # noqa
    started = time.monotonic()
    try:
        info = call().adapter  # a mutation that left a valid adapter: served like any other
        event("registered")
        assert info.name == "mut" and info.rank >= 1
        client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name="mut"))
        assert wait_for(lambda: not (state / "adapters" / "mut").exists(), 10)
    except grpc.RpcError as exc:
        event(exc.code().name)
        assert exc.code() in REFUSED, (exc.code(), exc.details())
        assert "adapter" in exc.details() or "data" in exc.details(), exc.details()
        assert str(state) not in exc.details()
    assert time.monotonic() - started < 10
    assert _left_behind(state, {"caps"}) == []
    assert [a.name for a in client.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters] == ["caps"]
