"""API.md's Required-behaviour rows, the restart check and the concurrent-streams check, run by a client
that knows only API.md (reflection, no stubs) against a real `loraplex serve` process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from .conftest import BROKEN, PROMPTS, free_port, scrape, wait_for
from .reflection_client import ReflectionClient

ADMIN_TOKEN = "admin-secret-token"
LIMITS = dict(max_new_tokens_limit=64, max_model_len=512, max_waiting=40, max_num_seqs=32)


class ServeProcess:
    def __init__(self, state_dir, adapter_root, token_file, log_path):
        self.port, self.metrics_port = free_port(), free_port()
        command = [sys.executable, "-m", "loraplex.server.cli", "serve", "--quantization", "none",
                   "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--state-dir", str(state_dir),
                   "--adapter-root", str(adapter_root), "--admin-token-file", str(token_file),
                   "--max-lora-rank", "16", "--max-loras", "4", "--kv-cache-bytes", str(256 << 20),
                   "--grace-seconds", "5", "--max-num-batched-tokens", "256"]
        for key, value in LIMITS.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.log = open(log_path, "a")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.wait_serving()
        self.client = ReflectionClient(self.channel, token=ADMIN_TOKEN)

    def wait_serving(self, timeout: float = 180):
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "loraplex serve exited early"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not SERVING")

    def sigterm(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.channel.close()
        self.log.close()
        return code

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)


@pytest.fixture(scope="module")
def server_files(tmp_path_factory, adapter_root):
    base = tmp_path_factory.mktemp("outside")
    token_file = base / "admin.tokens"
    token_file.write_text(f"# admin tokens\n{ADMIN_TOKEN}\n")
    return dict(state_dir=base / "state", adapter_root=adapter_root, token_file=token_file, log_path=base / "serve.log")


@pytest.fixture(scope="module")
def served(server_files):
    server = ServeProcess(**server_files)
    for name in ("caps", "pirate", "caps_soft", "pirate_soft"):
        server.client.call("Adapters", "RegisterAdapter", {"name": name, "source": name})
    server.client.call("Adapters", "PinAdapter", {"name": "caps"})
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def gen(prompt=PROMPTS[0], tokens=8, **fields) -> dict:
    return {"messages": {"messages": [{"role": "user", "content": prompt}]},
            "stopping": {"max_new_tokens": tokens, "ignore_eos": True}, **fields}


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_reflection_lists_the_services(served):
    services = set(served.client.services())
    assert {"loraplex.v1.Generation", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= services
    for enum, names in (("MergeMethod", ["LINEAR", "TIES", "DARE_LINEAR", "DARE_TIES"]),
                        ("StopReason", ["NOT_FINISHED", "MAX_TOKENS", "EOS_TOKEN", "STOP_SEQUENCE", "CANCELLED",
                                        "ERROR"]),
                        ("AdapterState", ["REGISTERED", "LOADING", "HOST", "DEVICE"])):
        assert [served.client.enum_value(enum, n) for n in names] == list(range(len(names)))


def test_generate_with_an_adapter(served):
    reply = served.client.call("Generation", "Generate", gen(adapter="caps", request_id="r-1"))
    assert reply["stop_reason"] == "MAX_TOKENS" and reply["generated_tokens"] == 8 and len(reply["token_ids"]) == 8
    assert reply["adapter_version"] == "caps@1" and reply["request_id"] == "r-1" and reply["text"]
    assert reply["text"].upper() == reply["text"]  # the caps adapter answers in capitals


def test_unknown_adapter_is_not_found(served):
    code, details = code_of(lambda: served.client.call("Generation", "Generate", gen(adapter="no-such-adapter")))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in details


BAD_PARAMETERS = [
    ({"sampling": {"temperature": -1.0}}, "temperature"),
    ({"sampling": {"temperature": "NaN"}}, "temperature"),
    ({"sampling": {"top_p": 0.0}}, "top_p"),
    ({"sampling": {"top_p": 1.5}}, "top_p"),
    ({"stopping": {"max_new_tokens": 65}}, "max_new_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"adapter": "caps", "adapters": [{"name": "pirate", "weight": 1.0}]}, "adapters"),
    ({"adapters": [{"name": "caps", "weight": "NaN"}]}, "weight"),
    ({"adapters": [{"name": "caps", "weight": "Infinity"}]}, "weight"),
    ({"prompt": "word " * 600}, "prompt"),
]


@pytest.mark.parametrize("fields, field", BAD_PARAMETERS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_PARAMETERS)])
def test_bad_parameters_are_invalid_argument_naming_the_field(served, fields, field):
    request = {"stopping": {"max_new_tokens": 4}, "prompt": "Hello", **fields}
    for rpc in ("Generate", "GenerateStream"):
        call = (lambda: served.client.call("Generation", rpc, request)) if rpc == "Generate" else \
            (lambda: list(served.client.stream("Generation", rpc, request)))
        code, details = code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, (rpc, details)


def test_empty_input_is_invalid_argument(served):
    code, details = code_of(lambda: served.client.call("Generation", "Generate", {"adapter": "caps"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details


def _adapter_names(served) -> list[tuple[str, int]]:
    return [(a["name"], a["version"]) for a in served.client.call("Adapters", "ListAdapters", {})["adapters"]]


@pytest.mark.parametrize("source", [f"broken/{how}" for how in BROKEN] + ["/etc", "../outside", "caps/../../x"])
def test_bad_adapters_are_refused_and_nothing_is_half_registered(served, server_files, source):
    before = _adapter_names(served)
    code, details = code_of(lambda: served.client.call("Adapters", "RegisterAdapter",
                                                       {"name": "bad", "source": source}))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), details
    assert _adapter_names(served) == before
    code, _ = code_of(lambda: served.client.call("Adapters", "GetAdapter", {"name": "bad"}))
    assert code == grpc.StatusCode.NOT_FOUND
    state = server_files["state_dir"]
    assert not (state / "adapters" / "bad").exists() and not list((state / "tmp").iterdir())
    assert served.client.call("Generation", "Generate", gen(adapter="pirate", tokens=2))["generated_tokens"] == 2


def test_bad_upload_is_refused_and_nothing_is_half_registered(served, adapter_root):
    before = _adapter_names(served)
    corrupt = adapter_root / "broken" / "corrupt"
    messages = [{"name": "bad-upload"}] + [
        {"file_name": f, "data": __import__("base64").b64encode((corrupt / f).read_bytes()).decode()}
        for f in ("adapter_config.json", "adapter_model.safetensors")]
    code, details = code_of(lambda: served.client.upload("Adapters", "UploadAdapter", messages))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "safetensors" in details
    assert _adapter_names(served) == before


def test_queue_full_is_resource_exhausted_at_once(served):
    """max_num_seqs running, then max_waiting waiting: the next request is refused at once."""
    streams = []
    try:
        for i in range(LIMITS["max_num_seqs"]):
            streams.append(served.client.stream("Generation", "GenerateStream", gen(tokens=64, prompt=f"Story {i}:")))
        assert wait_for(lambda: served.metrics()["loraplex_running_batch_size"] == LIMITS["max_num_seqs"], 30)
        for i in range(LIMITS["max_waiting"]):
            streams.append(served.client.stream("Generation", "GenerateStream", gen(tokens=4, prompt=f"Poem {i}:")))
        assert wait_for(lambda: served.metrics()["loraplex_queue_depth"] == LIMITS["max_waiting"], 30)
        started = time.monotonic()
        code, details = code_of(lambda: served.client.call("Generation", "Generate", gen(tokens=4)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 1.0, details
    finally:
        for stream in streams:
            stream.cancel()
    assert wait_for(lambda: _idle(served.metrics()), 10)


def _idle(metrics: dict) -> bool:
    return (metrics["loraplex_queue_depth"], metrics["loraplex_running_batch_size"],
            metrics["loraplex_kv_cache_usage_ratio"]) == (0, 0, 0)


def test_cancel_and_deadline_stop_generation_and_free_kv(served):
    stream = served.client.stream("Generation", "GenerateStream", gen(tokens=64))
    try:
        messages = iter(stream)
        next(messages), next(messages)
        assert served.metrics()["loraplex_kv_cache_usage_ratio"] > 0
    finally:
        stream.cancel()
    assert wait_for(lambda: _idle(served.metrics()), 5)
    started = time.monotonic()
    code, _ = code_of(lambda: served.client.call("Generation", "Generate", gen(tokens=64), timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 2
    assert wait_for(lambda: _idle(served.metrics()), 5)
    metrics = served.metrics()
    assert metrics['loraplex_requests_total{adapter="base",code="CANCELLED"}'] >= 1
    assert metrics['loraplex_requests_total{adapter="base",code="DEADLINE_EXCEEDED"}'] >= 1


def test_admin_calls_need_the_token(served):
    client = served.client
    code, _ = code_of(lambda: ReflectionClient(served.channel).call("Adapters", "ListAdapters", {}))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(lambda: client.call("Adapters", "ListAdapters", {}, token="wrong"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(lambda: client.upload("Adapters", "UploadAdapter", [{"name": "x"}], token="wrong"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(lambda: ReflectionClient(served.channel).call("Adapters", "RegisterAdapter",
                                                                    {"name": "x", "source": "caps"}))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "x" not in [n for n, _ in _adapter_names(served)]


PLAN = [(PROMPTS[i % 4], spec) for i, spec in enumerate(
    [{}, {"adapter": "caps"}, {"adapter": "pirate"}, {"adapter": "caps_soft"}, {"adapter": "pirate_soft"},
     {"adapters": [{"name": "caps", "weight": 0.7}, {"name": "pirate", "weight": 0.3}]},
     {"adapters": [{"name": "pirate", "weight": 0.5}, {"name": "pirate_soft", "weight": -0.5}]},
     {"adapter": "caps", "sampling": {"temperature": 0.8, "seed": 7}}])]


def _streamed(client, prompt, spec, tokens=10) -> tuple[list[int], str]:
    messages = list(client.stream("Generation", "GenerateStream", gen(prompt, tokens=tokens, **spec)))
    assert messages[-1]["stop_reason"] == "MAX_TOKENS"
    return [t for m in messages for t in m["token_ids"]], "".join(m["text"] for m in messages)


def test_32_concurrent_streams_each_equal_to_alone(served):
    alone = [_streamed(served.client, prompt, spec) for prompt, spec in PLAN]
    work = [PLAN[i % len(PLAN)] for i in range(32)]
    peak, running = [0], threading.Event()

    def watch():  # the running batch size, as Prometheus shows it, while the streams run
        while not running.is_set():
            peak[0] = max(peak[0], served.metrics()["loraplex_running_batch_size"])
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda item: _streamed(served.client, *item), work))
    finally:
        running.set()
        watcher.join()
    for i, result in enumerate(together):
        assert result == alone[i % len(PLAN)], (i, work[i])
    assert peak[0] > 8, peak  # they shared batches (up to max_num_seqs=32), not just the queue
    assert len({tuple(ids) for ids, _ in alone}) == len(PLAN)  # every adapter choice changes the output


def test_restart_keeps_the_registry(served, server_files):
    client = served.client
    before = {a["name"]: a for a in client.call("Adapters", "ListAdapters", {})["adapters"]}
    client.call("Adapters", "RegisterAdapter", {"name": "pirate", "source": "caps"})  # pirate@2, caps' weights
    expected = {spec["adapter"]: client.call("Generation", "Generate", gen(adapter=spec["adapter"]))
                for _, spec in PLAN[1:5]}
    assert expected["pirate"]["adapter_version"] == "pirate@2"
    in_flight = iter(client.stream("Generation", "GenerateStream", gen(tokens=16, prompt="Story:")))
    received = [next(in_flight)]  # running when SIGTERM comes
    reader = threading.Thread(target=lambda: received.extend(in_flight))
    reader.start()
    assert served.sigterm() == 0  # drained and exited cleanly
    reader.join(30)
    assert received[-1]["stop_reason"] == "MAX_TOKENS" and received[-1]["generated_tokens"] == 16  # finished
    restarted = ServeProcess(**server_files)
    try:
        after = {a["name"]: a for a in restarted.client.call("Adapters", "ListAdapters", {})["adapters"]}
        assert set(after) == set(before)
        for name, info in after.items():
            assert (info["version"], info["sha256"]) == ((2, before["caps"]["sha256"]) if name == "pirate" else
                                                         (before[name]["version"], before[name]["sha256"]))
            assert int(info["request_count"]) >= 1
        assert after["caps"]["pinned"] and after["caps"]["state"] == "DEVICE"  # pinned ones are preloaded
        for name, reply in expected.items():
            again = restarted.client.call("Generation", "Generate", gen(adapter=name))
            assert (again["token_ids"], again["adapter_version"]) == (reply["token_ids"], reply["adapter_version"])
        registered = restarted.client.call("Adapters", "RegisterAdapter", {"name": "pirate", "source": "pirate"})
        assert registered["adapter"]["version"] == 3  # versions never repeat
    finally:
        assert restarted.sigterm() == 0
