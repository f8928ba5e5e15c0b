"""Real servers for the service tests: in-process (a grpc.aio server on its own event-loop thread over
an Engine on the session's fp32 embedded model) or a `loraplex serve` subprocess; adapter folders
made from the example adapters."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServiceConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "adapters"
PROMPTS = ["What is the capital of France?", "Name a color.", "Tell me about the sea.", "Count to five."]


def engine_config_for_tests(cache_dir, **scheduler) -> EngineConfig:
    limits = dict(max_num_seqs=16, max_num_batched_tokens=256, max_waiting=32, max_new_tokens_limit=64,
                  default_max_new_tokens=16)
    limits.update(scheduler)
    return EngineConfig(
        model=ModelConfig(quantization="none", dtype="float32", max_model_len=512),
        lora=LoRAConfig(max_lora_rank=16, max_loras=4, max_cpu_loras=16, max_adapters_per_request=3,
                        derived_rank=16),
        cache=CacheConfig(block_size=16, num_blocks=400),
        scheduler=SchedulerConfig(**limits), cache_dir=str(cache_dir))


class ServerThread:
    """A LoraplexServer on an event loop in a background thread; `target` is its address."""

    def __init__(self, service: ServiceConfig, engine_config: EngineConfig, loaded, load: bool = True):
        from loraplex.server.service.server import LoraplexServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()

        async def make():
            return LoraplexServer(service, engine_config, loaded)
        self.server = self.run(make())
        self.run(self.server.start())
        if load:
            self.run(self.server.load())

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine(self):
        return self.server.runtime.engine

    def metrics(self) -> dict[str, float]:
        return scrape(self.server.metrics_port)

    def stop(self, grace: float = 0.0) -> None:
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def register_examples(target: str, names) -> None:
    """Register adapters of the session's adapter root under their own names (source = name)."""
    from loraplex.client import Client, ClientConfig

    with Client(ClientConfig(target=target)) as client:
        for name in names:
            client.register_adapter(name, name)


def registers(client, name: str, source: str) -> bool:
    """Whether `client.register_adapter(name, source)` went through (False: UNAVAILABLE, e.g. no database)."""
    from loraplex.client import Unavailable

    try:
        client.register_adapter(name, source)
    except Unavailable:
        return False
    return True


@pytest.fixture(scope="module")
def client(server):
    """A client of the module's `server` fixture (modules may define their own)."""
    from loraplex.client import Client, ClientConfig

    with Client(ClientConfig(target=server.target, timeout=120)) as c:
        yield c


def scrape(port: int) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll until predicate() is truthy; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scaled_copy(src: Path, dst: Path, factor: float) -> Path:
    """The adapter at `src` with every lora_B scaled: a distinct adapter of the same shape."""
    dst.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: (v * factor if "lora_B" in k else v).contiguous() for k, v in tensors.items()},
              str(dst / "adapter_model.safetensors"))
    return dst


def broken_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of the adapter at `src`, broken in one of the ways API.md's table lists."""
    shutil.copytree(src, dst)
    weights, config_path = dst / "adapter_model.safetensors", dst / "adapter_config.json"
    config = json.loads(config_path.read_text())
    tensors = load_file(str(weights))
    if how == "other_base":  # A widened: in_features of another model
        save_file({k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in tensors.items()}, str(weights))
    elif how == "rank_over_max":  # rank 8 -> 40 (servers in these tests accept 16 at most)
        save_file({k: torch.cat([v] * 5, dim=0 if "lora_A" in k else 1).contiguous() for k, v in tensors.items()},
                  str(weights))
        config["r"] = config["r"] * 5
        config_path.write_text(json.dumps(config))
    elif how == "unknown_target":
        save_file({k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()}, str(weights))
    elif how == "pickle":
        weights.rename(dst / "adapter_model.bin")
    elif how == "corrupt":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "nan":
        key = sorted(tensors)[0]
        tensors[key][0, 0] = float("nan")
        save_file(tensors, str(weights))
    else:
        raise ValueError(how)
    return dst


BROKEN = ["other_base", "rank_over_max", "unknown_target", "pickle", "corrupt", "nan"]


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    """caps, pirate, their half-strength copies, and one broken copy per kind under broken/."""
    root = tmp_path_factory.mktemp("adapter-root")
    for name in ("caps", "pirate"):
        shutil.copytree(EXAMPLES / name, root / name)
        scaled_copy(EXAMPLES / name, root / f"{name}_soft", 0.5)
    for how in BROKEN:
        broken_copy(EXAMPLES / "caps", root / "broken" / how, how)
    return root


def chat_request(text: str, **kwargs):
    """A raw GenerateRequest whose input is one user message (for tests that send protobuf as it is)."""
    from loraplex.v1 import generation_pb2

    return generation_pb2.GenerateRequest(
        messages=generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(role="user", content=text)]),
        **kwargs)
