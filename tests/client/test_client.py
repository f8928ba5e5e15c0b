"""loraplex.client against a real server on 127.0.0.1 (gRPC, the embedded model): typed results equal to the
raw stubs' answers, errors carrying status and field, deadlines, retries on UNAVAILABLE only, the async
client, and the README's example run as written."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from loraplex.client import (AdapterInfo, AsyncClient, Client, DeadlineExceeded, GenerationResult,
                             InvalidArgument, ModelInfo, NotFound, PermissionDenied, RetryPolicy, StopReason,
                             Unauthenticated, Unavailable)
from loraplex.server.config import ServiceConfig
from loraplex.v1 import generation_pb2 as gpb

from ..service.conftest import ServerThread, adapter_root, chat_request, engine_config_for_tests, free_port  # noqa

README = Path(__file__).resolve().parents[2] / "README.md"
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server(smol_fp32, adapter_root, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("client")
    service = ServiceConfig(port=0, metrics_port=None, state_dir=str(base / "state"),
                            adapter_roots=(str(adapter_root),), admin_tokens=("admin",))
    running = ServerThread(service, engine_config_for_tests(base / "cache"), smol_fp32)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, token="admin", timeout=120) as c:
        yield c


def test_generate_and_stream_are_typed_and_equal_the_raw_call(client):
    raw = client.stubs.generation.Generate(chat_request(CHAT[0]["content"], top_logprobs=2,
                                                        stopping=gpb.StoppingCriteria(max_new_tokens=10)))
    result = client.generate(messages=CHAT, max_new_tokens=10, top_logprobs=2)
    assert isinstance(result, GenerationResult) and result.text == raw.text and result.token_ids == list(raw.token_ids)
    assert [lp.logprob for lp in result.logprobs] == pytest.approx([lp.logprob for lp in raw.logprobs])
    assert len(result.logprobs[0].top) == 2 and result.stop_reason in (StopReason.MAX_TOKENS, StopReason.EOS_TOKEN)
    chunks = list(client.stream(messages=CHAT, max_new_tokens=10))
    assert "".join(c.text for c in chunks) == result.text and chunks[-1].stop_reason == result.stop_reason
    seeded = [client.generate("Once upon a time", temperature=1.0, seed=7, max_new_tokens=6, ignore_eos=True)
              for _ in range(2)]
    assert seeded[0].token_ids == seeded[1].token_ids and seeded[0].seed == 7 and seeded[0].generated_tokens == 6


def test_tokenize_and_model_info(client, server):
    tokens = client.tokenize("Hello world", return_tokens=True)
    assert list(tokens.token_ids) == server.engine.tokenizer("Hello world").input_ids and len(tokens.tokens) == 2
    assert len(client.tokenize(messages=CHAT).token_ids) > 5
    info = client.model_info()
    assert isinstance(info, ModelInfo) and (info.base_model, info.max_context) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", 512)


def test_adapter_admin_calls(client, adapter_root):  # noqa: F811
    registered = client.register_adapter("caps", str(adapter_root / "caps"))
    assert isinstance(registered, AdapterInfo) and (registered.name, registered.version, registered.rank) == (
        "caps", 1, 16)
    assert registered.registered_at and registered.state in ("REGISTERED", "HOST")
    uploaded = client.upload_adapter("pirate", adapter_root / "pirate", pin=True)
    assert (uploaded.source, uploaded.pinned) == ("upload", True)
    assert [a.name for a in client.list_adapters()] == ["caps", "pirate"]
    assert client.load_adapter("caps").state == "DEVICE" and client.get_adapter("caps").state == "DEVICE"
    assert not client.unpin_adapter("pirate").pinned and client.pin_adapter("caps").pinned
    client.unpin_adapter("caps")
    assert client.unload_adapter("caps").state == "REGISTERED"
    mixed = client.generate(messages=CHAT, adapters={"caps": 0.5, "pirate": 0.5}, max_new_tokens=4)
    assert mixed.adapter_versions == {"caps": 1, "pirate": 1}
    assert client.delete_adapter("pirate").name == "pirate"
    assert [a.name for a in client.list_adapters()] == ["caps"]


def test_errors_carry_status_and_field(client, server):
    with pytest.raises(InvalidArgument) as info:
        client.generate("Hi", temperature=-1.0)
    assert info.value.field == "sampling.temperature" and info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in info.value.message
    with pytest.raises(NotFound) as info:
        client.generate("Hi", adapter="no-such-adapter")
    assert info.value.field == "adapter" and "no-such-adapter" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        list(client.stream("Hi", max_new_tokens=10_000))
    assert info.value.field == "stopping.max_new_tokens"
    with Client(server.target) as anonymous:
        with pytest.raises(Unauthenticated) as info:
            anonymous.list_adapters()
        assert info.value.field == "authorization"
    with Client(server.target, token="wrong") as wrong, pytest.raises(PermissionDenied):
        wrong.get_adapter("caps")


def test_deadline(client):
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.generate("Once upon a time", max_new_tokens=64, ignore_eos=True, timeout=0.2)
    assert time.monotonic() - started < 5


def test_unavailable_is_retried_with_backoff_and_nothing_else_is(smol_fp32, tmp_path, server):
    port = free_port()
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.2, multiplier=2)
    with Client(f"127.0.0.1:{port}", retry=policy) as nobody:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            nobody.model_info()
        assert time.monotonic() - started >= 0.6  # two waits: 0.2 s, then 0.4 s
    with Client(server.target, retry=policy) as refused:
        started = time.monotonic()
        with pytest.raises(InvalidArgument):
            refused.generate("")
        assert time.monotonic() - started < 0.2
    later = {}

    def start_later():
        time.sleep(1.0)
        later["server"] = ServerThread(ServiceConfig(port=port, metrics_port=None, state_dir=str(tmp_path / "state")),
                                       engine_config_for_tests(tmp_path / "cache"), smol_fp32)
    starter = threading.Thread(target=start_later)
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=20, initial_backoff=0.25, max_backoff=1)) as c:
            assert c.generate("Hi", max_new_tokens=2, ignore_eos=True).generated_tokens == 2  # retried until up
    finally:
        starter.join()
        later["server"].stop()


def test_async_client(server):
    async def main():
        async with AsyncClient(server.target, token="admin", timeout=120) as client:
            results = await asyncio.gather(*(client.generate(messages=CHAT, max_new_tokens=8) for _ in range(3)))
            assert len({tuple(r.token_ids) for r in results}) == 1
            chunks = [chunk async for chunk in client.stream(messages=CHAT, max_new_tokens=8)]
            assert "".join(c.text for c in chunks) == results[0].text
            assert (await client.model_info()).max_context == 512
            assert [a.name for a in await client.list_adapters()] == ["caps"]
            with pytest.raises(InvalidArgument) as info:
                await client.generate("Hi", top_p=2.0)
            assert info.value.field == "sampling.top_p"
            with pytest.raises(InvalidArgument):
                async for _ in client.stream("Hi", top_p=2.0):
                    pass
    asyncio.run(main())


def test_readme_example_runs_as_written(server, tmp_path):
    """The README's client example, with only the server's address changed to this test server's."""
    section = README.read_text().split("## Python client", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 5 and "127.0.0.1:50051" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("127.0.0.1:50051", server.target))
    with Client(server.target, token="admin") as admin:
        if "caps" not in [a.name for a in admin.list_adapters()]:
            admin.register_adapter("caps", "caps")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Client(server.target) as client:
        expected = client.generate(messages=CHAT, adapter="caps").text
    assert done.stdout.strip() == expected.strip() and expected.strip()
