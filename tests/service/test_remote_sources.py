"""hf:// and s3:// adapter sources and load on first use (--adapter-source), on an in-process server
against real stores on 127.0.0.1: moto's S3 server, and a small HTTP server answering the hub's file
routes (huggingface_hub pointed at it, online for this module only)."""
from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import threading
import time

import boto3
import grpc
import huggingface_hub
import pytest
from moto.server import ThreadedMotoServer

from loraplex.server.adapters.loader import max_weights_bytes
from loraplex.server.adapters.peft_format import read_lora_config
from loraplex.server.adapters.sources import ADAPTER_FILES
from loraplex.server.config import ServiceConfig
from loraplex.server.errors import ConfigError
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import generation_pb2 as gpb

from .conftest import PROMPTS, ServerThread, chat_request, engine_config_for_tests, free_port, wait_for
from .hub_server import HubServer

BUCKET = "adapters"
RULES = ("lazy-*=s3://adapters/{name}", "slow-*=hf://slow/{name}")
SECONDS_PER_CHUNK = 0.035
"""The slow hub repository sends the 3.7 MB weights in 64 KiB chunks over about two seconds."""


def request(adapter="", tokens=6):
    return chat_request(PROMPTS[2], adapter=adapter,
                        stopping=gpb.StoppingCriteria(max_new_tokens=tokens, ignore_eos=True))


def register(client, name, source):
    return client.stubs.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name=name, source=source)).adapter


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def stores_env():
    """Credentials for moto; huggingface_hub online (the suite runs offline) since its hub is on 127.0.0.1."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                               AWS_DEFAULT_REGION="us-east-1").items():
            patch.setenv(key, value)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield patch


@pytest.fixture(scope="module")
def s3(stores_env, adapter_root):
    """moto's S3 server on 127.0.0.1 with the caps adapter under caps/ and lazy-caps/, and a config alone."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    url = "http://%s:%d" % server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for prefix in ("caps", "lazy-caps"):
        for file_name in ADAPTER_FILES:
            client.upload_file(str(adapter_root / "caps" / file_name), BUCKET, f"{prefix}/{file_name}")
    client.upload_file(str(adapter_root / "caps" / "adapter_config.json"), BUCKET, "config-only/adapter_config.json")
    yield client
    server.stop()


@pytest.fixture(scope="module")
def hub(stores_env, adapter_root):
    caps = adapter_root / "caps"
    server = HubServer({"acme/caps": caps, "slow/slow-caps": caps, "slow/gone": caps, "acme/huge": caps,
                        "acme/full": caps},
                       seconds_per_chunk={"slow/slow-caps": SECONDS_PER_CHUNK, "slow/gone": SECONDS_PER_CHUNK},
                       announced_sizes={("acme/huge", "adapter_model.safetensors"): 3 << 30})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(smol_fp32, adapter_root, s3, hub, tmp_path_factory):
    base = tmp_path_factory.mktemp("remote")
    service = ServiceConfig(port=0, metrics_port=None, state_dir=str(base / "state"),
                            adapter_roots=(str(adapter_root),), adapter_sources=RULES, hf_endpoint=hub.url,
                            hf_cache_dir=str(base / "hf-cache"), s3_endpoint_url=s3.meta.endpoint_url)
    running = ServerThread(service, engine_config_for_tests(base / "cache", max_waiting=64, max_new_tokens_limit=256),
                           smol_fp32)
    yield running
    running.stop()


def staging_files(server) -> list:
    return list((server.server.runtime.registry.state_dir / "tmp").iterdir())


def test_s3_and_hub_sources_serve_the_same_tokens_as_the_folder(client, server):
    local, from_s3, from_hub = (register(client, "caps", "caps"), register(client, "s3caps", "s3://adapters/caps"),
                                register(client, "hfcaps", "hf://acme/caps"))
    assert local.sha256 == from_s3.sha256 == from_hub.sha256
    assert from_s3.source == "s3://adapters/caps"
    assert from_hub.source == f"hf://acme/caps@{HubServer.commit('acme/caps')}"  # the revision, pinned
    records = json.loads((server.server.runtime.registry.path).read_text())["adapters"]
    assert (records["hfcaps"]["source"], records["hfcaps"]["sha256"]) == (from_hub.source, local.sha256)
    tokens = {name: list(client.stubs.generation.Generate(request(name, tokens=8)).token_ids)
              for name in ("", "caps", "s3caps", "hfcaps")}
    assert tokens["caps"] == tokens["s3caps"] == tokens["hfcaps"] != tokens[""]


def test_50_first_requests_for_one_name_register_it_once(client, server):
    futures = [client.stubs.generation.Generate.future(request("lazy-caps", tokens=2), timeout=120) for _ in range(50)]
    results = [future.result() for future in futures]
    assert {r.adapter_version for r in results} == {"lazy-caps@1"}
    first_use = server.server.runtime.first_use
    assert first_use.registrations == 1 and first_use.joined >= 40  # they did arrive together
    info = client.stubs.adapters.GetAdapter(apb.GetAdapterRequest(name="lazy-caps")).adapter
    assert (info.version, info.source) == (1, "s3://adapters/lazy-caps")
    register(client, "caps-folder", "caps")
    expected = list(client.stubs.generation.Generate(request("caps-folder", tokens=2)).token_ids)
    assert all(list(r.token_ids) == expected for r in results)


def _registered(client, name: str) -> bool:
    return any(a.name == name for a in client.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters)


def test_failed_first_use_fails_its_requests_with_a_clear_status(client, server):
    error = rpc_error(lambda: client.stubs.generation.Generate(request("lazy-missing")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "adapter" in error.details() and "s3://adapters/lazy-missing" in error.details()
    error = rpc_error(lambda: client.stubs.generation.Generate(request("matches-no-rule")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "matches-no-rule" in error.details()
    assert not staging_files(server) and not _registered(client, "lazy-missing")


def test_slow_source_does_not_delay_running_requests(client, server, hub):
    """While the slow hub sends the weights (about 2 s), a running stream's tokens keep their pace: no gap
    is more than one step longer than the longest gap it had before the load began."""
    arrivals: list[float] = []

    call = client.stubs.generation.GenerateStream(request("", tokens=200))

    def stream():
        with contextlib.suppress(grpc.RpcError):  # cancelled below once the load is done
            for message in call:
                arrivals.extend([time.monotonic()] * len(message.token_ids))
    reader = threading.Thread(target=stream)
    reader.start()
    while len(arrivals) < 30:
        time.sleep(0.01)
    started = time.monotonic()
    result = client.stubs.generation.Generate(request("slow-caps", tokens=2))  # registered from the slow hub first
    call.cancel()
    reader.join()
    sent = hub.sent["/slow/slow-caps/resolve/%s/adapter_model.safetensors" % HubServer.commit("slow/slow-caps")]
    assert result.adapter_version == "slow-caps@1" and sent - started > 1.5  # it really was slow
    gaps = [(b - a, b) for a, b in zip(arrivals, arrivals[1:])]
    before = [gap for gap, at in gaps if at < started]
    during = [gap for gap, at in gaps if started <= at <= sent]
    assert len(during) > 10, "the stream ended before the slow load did"
    step = statistics.median(before)
    assert max(during) <= max(before) + step + 0.02, (step, max(before), sorted(during)[-5:])
    assert statistics.median(during) <= 1.5 * step, (step, statistics.median(during))


def test_a_download_stops_when_its_client_goes_away(client, server, hub):
    call = lambda: client.stubs.adapters.RegisterAdapter(  # noqa: E731
        apb.RegisterAdapterRequest(name="gone", source="hf://slow/gone"), timeout=0.5)
    assert rpc_error(call).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: not staging_files(server), timeout=2.0)
    time.sleep(3 * SECONDS_PER_CHUNK)
    assert any(path.startswith("/slow/gone/") for path in hub.gets)
    assert not [path for path in hub.sent if path.startswith("/slow/gone/") and path.endswith(".safetensors")]
    assert not _registered(client, "gone")


def test_bad_sources_are_refused_naming_the_field(client, server, hub):
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [("s3://", invalid), ("s3://Not_A_Bucket/caps", invalid), ("gs://adapters/caps", invalid),
             ("hf://a/b/c", invalid), ("hf://acme/caps@", invalid), ("s3://adapters/missing", missing),
             ("s3://no-such-bucket/caps", missing), ("s3://adapters/config-only", missing),
             ("hf://acme/missing", missing), ("hf://acme/caps@no-such-revision", missing)]
    for source, code in cases:
        error = rpc_error(lambda: register(client, "bad", source))
        assert (error.code(), "source" in error.details()) == (code, True), (source, error.details())
    assert not staging_files(server) and not _registered(client, "bad")


def test_oversized_objects_are_refused_before_they_are_fetched(client, server, s3, hub, adapter_root):
    engine = server.engine
    config = read_lora_config(adapter_root / "caps", "caps")
    limit = max_weights_bytes(config, engine.arch, engine.config.lora.max_lora_rank)
    s3.upload_file(str(adapter_root / "caps" / "adapter_config.json"), BUCKET, "huge/adapter_config.json")
    s3.put_object(Bucket=BUCKET, Key="huge/adapter_model.safetensors", Body=b"\0" * (limit + 1))
    for source in ("s3://adapters/huge", "hf://acme/huge"):
        error = rpc_error(lambda: register(client, "huge", source))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "source" in error.details()
        assert "nothing was copied" in error.details(), error.details()
    assert not [path for path in hub.gets if path.startswith("/acme/huge/") and path.endswith(".safetensors")]
    assert not staging_files(server) and not _registered(client, "huge")


def test_full_disk_is_refused_before_the_weights_are_fetched(client, server, hub):
    registry = server.server.runtime.registry
    registry.min_free_disk_bytes = shutil.disk_usage(registry.state_dir).free + (1 << 40)  # as if the disk were full
    try:
        for source in ("hf://acme/full", "s3://adapters/caps"):
            error = rpc_error(lambda: register(client, "full", source))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "free" in error.details()
    finally:
        registry.min_free_disk_bytes = 0
    assert not [path for path in hub.gets if path.startswith("/acme/full/") and path.endswith(".safetensors")]
    assert not staging_files(server) and not _registered(client, "full")


def test_offline_hub_reads_only_its_cache(client, server, hub, stores_env):
    cache_dir = server.server.config.hf_cache_dir
    for file_name in ADAPTER_FILES:  # the hub library itself fills its cache, online
        huggingface_hub.hf_hub_download("acme/caps", file_name, cache_dir=cache_dir, endpoint=hub.url)
    fetched = len(hub.gets)
    stores_env.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        info = register(client, "offline-caps", "hf://acme/caps")
        assert info.source == f"hf://acme/caps@{HubServer.commit('acme/caps')}" and len(hub.gets) == fetched
        error = rpc_error(lambda: register(client, "offline-slow", "hf://slow/slow-caps"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "HF_HUB_OFFLINE" in error.details()
    finally:
        stores_env.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_adapter_source_flags_and_env_reach_the_config():
    from loraplex.server.cli import build_parser
    from loraplex.server.service.serve_cmd import configs_from_args

    def service(argv, environ):
        args = build_parser().parse_args(["serve", "--device", "cpu", *argv])
        args._layers.resolve(args, {}, environ)
        return configs_from_args(args)[0]

    flags = service(["--adapter-source", RULES[0], "--adapter-source", RULES[1], "--s3-endpoint-url", "http://s3",
                     "--hf-endpoint", "http://hub"], {})
    assert (flags.adapter_sources, flags.s3_endpoint_url, flags.hf_endpoint) == (RULES, "http://s3", "http://hub")
    assert service([], {"LORAPLEX_ADAPTER_SOURCES": " ".join(RULES)}).adapter_sources == RULES
    with pytest.raises(ConfigError, match="PATTERN=SOURCE"):
        ServiceConfig(adapter_sources=("s3://bucket/{name}",))
