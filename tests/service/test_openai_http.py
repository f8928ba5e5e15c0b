"""The OpenAI-compatible HTTP API, through the official `openai` package against a real server on
127.0.0.1 (gRPC and HTTP on one event loop and engine): the same tokens as gRPC Generate for the same
request and seed, streaming included, and every error row of API.md with its HTTP code and body."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from loraplex.client import Client
from loraplex.server.config import ServiceConfig
from loraplex.v1 import generation_pb2 as gpb
from loraplex.v1 import generation_pb2_grpc

from .conftest import EXAMPLES, PROMPTS, ServerThread, engine_config_for_tests, wait_for

CHAT = [{"role": "user", "content": PROMPTS[0]}]
STORY = "Once upon a time, in a small village by the sea,"
SAMPLED = dict(temperature=0.9, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def server(smol_fp32, adapter_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("openai")
    service = ServiceConfig(port=0, http_port=0, metrics_port=None, state_dir=str(base / "state"),
                            adapter_roots=(str(adapter_root),))
    running = ServerThread(service, engine_config_for_tests(base / "cache"), smol_fp32)
    for name in ("caps", "pirate"):
        running.engine.register_adapter(name, str(adapter_root / name))
    yield running
    running.stop()


def url(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}/v1"


def raw(server, path: str, body: str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a request the SDK would not send (NaN, broken JSON, no model, no token)."""
    request = urllib.request.Request(url(server) + path, data=body.encode() if body is not None else None,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=url(server), api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield generation_pb2_grpc.GenerationStub(channel)
    channel.close()


def grpc_generate(stub, tokens: int, sampling: dict, chat: bool = False, logprobs: int = 0, **fields):
    params = gpb.SamplingParameters(**sampling)
    if chat:
        fields["messages"] = gpb.ChatMessages(messages=[gpb.ChatMessage(**m) for m in CHAT])
    return stub.Generate(gpb.GenerateRequest(sampling=params, top_logprobs=logprobs,
                                             stopping=gpb.StoppingCriteria(max_new_tokens=tokens), **fields),
                         timeout=120)


def test_models_list_base_and_every_adapter(oai, server):
    ids = [m.id for m in oai.models.list().data]
    assert ids == ["base", "HuggingFaceTB/SmolLM2-135M-Instruct", "caps", "pirate"]
    caps = oai.models.retrieve("caps@1")
    assert (caps.id, caps.owned_by, caps.model_extra["version"], caps.model_extra["rank"]) == ("caps", "loraplex", 1, 16)
    assert oai.models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("caps@7")
    assert info.value.body["param"] == "model" and "current version of 'caps' is 1" in info.value.body["message"]


@pytest.mark.parametrize("model, sampling", [("base", dict(temperature=0)), ("caps", dict(temperature=0)),
                                             ("pirate@1", SAMPLED), ("HuggingFaceTB/SmolLM2-135M-Instruct", SAMPLED)])
def test_completions_equal_grpc_generate(oai, stub, model, sampling):
    adapter = model.partition("@")[0] if model in ("caps", "pirate@1") else ""
    expected = grpc_generate(stub, 12, sampling, prompt=PROMPTS[2], adapter=adapter)
    whole = oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=12, **sampling)
    assert whole.choices[0].text == expected.text and whole.usage.completion_tokens == expected.generated_tokens
    assert whole.usage.prompt_tokens == expected.input_tokens and whole.model == model
    assert whole.choices[0].finish_reason == ("length" if expected.stop_reason == gpb.MAX_TOKENS else "stop")
    parts = list(oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=12, stream=True, **sampling))
    assert "".join(p.choices[0].text for p in parts) == expected.text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_equals_grpc_generate_with_the_chat_template(oai, stub):
    for sampling in (dict(temperature=0), SAMPLED):
        expected = grpc_generate(stub, 12, sampling, chat=True, adapter="pirate", logprobs=2)
        whole = oai.chat.completions.create(model="pirate", messages=CHAT, max_tokens=12, logprobs=True,
                                            top_logprobs=2, **sampling)
        message = whole.choices[0].message
        assert (message.role, message.content) == ("assistant", expected.text)
        content = whole.choices[0].logprobs.content
        assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in expected.logprobs])
        assert all(len(c.top_logprobs) == 2 for c in content) and whole.system_fingerprint == "pirate@1"
        events = list(oai.chat.completions.create(model="pirate", messages=CHAT, max_tokens=12, stream=True,
                                                  stream_options={"include_usage": True}, **sampling))
        assert events[0].choices[0].delta.role == "assistant" and events[-1].usage.completion_tokens == 12
        assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == expected.text


def test_weighted_mix_extension_equals_grpc_mix(oai, stub, server):
    mix = [{"name": "caps", "weight": 0.5}, {"name": "pirate", "weight": 0.5}]
    expected = grpc_generate(stub, 10, {}, chat=True, adapters=[gpb.AdapterWeight(**m) for m in mix])
    whole = oai.chat.completions.create(model="base", messages=CHAT, max_tokens=10, temperature=0,
                                        extra_body={"adapters": mix})
    assert whole.choices[0].message.content == expected.text and whole.system_fingerprint == "caps@1,pirate@1"
    status, left_out = raw(server, "/chat/completions", json.dumps(  # `model` left out: the SDK requires one
        dict(messages=CHAT, max_tokens=10, temperature=0, adapters=mix)))
    assert status == 200 and left_out["choices"][0]["message"]["content"] == expected.text


def test_completion_logprobs_stop_and_token_prompt(oai, server):
    free = oai.completions.create(model="base", prompt=STORY, max_tokens=12, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    logprobs = free.choices[0].logprobs
    assert len(logprobs.tokens) == 12 and "".join(logprobs.tokens) == free.choices[0].text
    assert logprobs.top_logprobs is None and all(lp <= 0 for lp in logprobs.token_logprobs)
    stop = free.choices[0].text[3:7]
    stopped = oai.completions.create(model="base", prompt=STORY, max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free.choices[0].text[:free.choices[0].text.index(stop)]
    ids = server.engine.tokenizer(STORY).input_ids
    by_ids = oai.completions.create(model="base", prompt=ids, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == free.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_client_going_away_cancels_its_request(server, stream):
    engine = server.engine
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(
        {"model": "base", "prompt": STORY, "max_tokens": 64, "ignore_eos": True, "stream": stream}),
        {"Content-Type": "application/json"})
    assert wait_for(lambda: engine.running_batch_size() == 1, 10)
    steps = engine.steps_total
    connection.sock.shutdown(2)  # gone, as a client killed mid-request
    connection.close()
    assert wait_for(lambda: engine.running_batch_size() == 0 and engine.kv_usage() == 0, 10)
    assert engine.steps_total - steps < 32  # far fewer than the 64 tokens asked for


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return info.value.status_code, body["error"]


@pytest.mark.parametrize("fields, param", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=65), "max_tokens"), (dict(n=2), "n"), (dict(prompt=""), "prompt"),
    (dict(prompt="x" * 200_000), "prompt"), (dict(logprobs=50), "logprobs"), (dict(seed=-1), "seed"),
    (dict(extra_body={"adapters": [{"name": "caps", "weight": 1.0}]}, model="caps"), "adapters"),
    (dict(extra_body={"adapters": []}), "adapters"), (dict(extra_body={"temprature": 1}), "temprature"),
    (dict(model=None), "model"), (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(stop=["x"] * 17), "stop"),
])
def test_bad_completion_fields_are_400_naming_the_field(oai, fields, param):
    request = dict(model="base", prompt="Hello", max_tokens=4)
    request.update(fields)
    if request["model"] is None:
        request["model"] = ""
    for stream in (False, True):
        status, error = error_of(lambda: oai.completions.create(stream=stream, **request))
        assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error", error
        assert error["message"].startswith(param), error


@pytest.mark.parametrize("messages, param", [
    ([], "messages"), ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"), ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
])
def test_bad_chat_fields_are_400_naming_the_field(oai, messages, param):
    status, error = error_of(lambda: oai.chat.completions.create(model="base", messages=messages, max_tokens=4))
    assert status == 400 and error["param"] == param, error
    status, error = error_of(lambda: oai.chat.completions.create(model="base", messages=CHAT, max_tokens=4,
                                                                 top_logprobs=3))
    assert status == 400 and error["param"] == "top_logprobs"


def test_raw_bodies_nan_weights_and_bad_json(server):
    status, nan = raw(server, "/completions", '{"prompt": "hi", "adapters": [{"name": "caps", "weight": NaN}]}')
    assert status == 400 and nan["error"]["param"] == "adapters[0].weight", nan
    status, broken = raw(server, "/completions", "{")
    assert status == 400 and "JSON" in broken["error"]["message"]
    huge = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    huge.putrequest("POST", "/v1/completions")  # 17 MiB announced: refused before a byte of it is read
    huge.putheader("Content-Length", str(17 << 20))
    huge.putheader("Content-Type", "application/json")
    huge.endheaders()
    reply = huge.getresponse()
    assert reply.status == 413 and "at most 16777216 bytes" in json.loads(reply.read())["error"]["message"]
    huge.close()
    status, nowhere = raw(server, "/nowhere")
    assert status == 404 and nowhere["error"]["code"] == "not_found"


def test_unknown_models_are_404(oai):
    for model in ("nope", "caps@2"):
        for stream in (False, True):
            status, error = error_of(lambda: oai.completions.create(model=model, prompt="hi", stream=stream))
            assert (status, error["param"], error["code"]) == (404, "model", "model_not_found")
            assert model.partition("@")[0] in error["message"]
    status, error = error_of(lambda: oai.chat.completions.create(
        model="base", messages=CHAT,
        extra_body={"adapters": [{"name": "caps", "weight": 1}, {"name": "x", "weight": 1}]}))
    assert (status, error["param"]) == (404, "adapters[1].name")


def test_tokens_are_the_generation_tokens(smol_fp32, tmp_path):
    server = ServerThread(
        ServiceConfig(port=0, http_port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                      generation_tokens=("s3cret",)), engine_config_for_tests(tmp_path / "cache"), smol_fp32)
    try:
        status, missing = raw(server, "/models")
        assert status == 401 and missing["error"]["type"] == "authentication_error"
        for key, status in (("wrong", 403), ("s3cret", 200)):
            with openai.OpenAI(base_url=url(server), api_key=key, max_retries=0) as client:
                if status == 200:
                    assert client.completions.create(model="base", prompt="Hi", max_tokens=2).usage.completion_tokens
                else:
                    code, error = error_of(lambda: client.chat.completions.create(model="base", messages=CHAT))
                    assert (code, error["type"], error["param"]) == (403, "permission_error", "authorization")
    finally:
        server.stop()


def test_queue_full_is_429(smol_fp32, tmp_path):
    server = ServerThread(ServiceConfig(port=0, http_port=0, metrics_port=None, state_dir=str(tmp_path / "state")),
                          engine_config_for_tests(tmp_path / "cache", max_num_seqs=1, max_waiting=2), smol_fp32)
    try:
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(server.target))
        long = gpb.GenerateRequest(prompt="Hi", stopping=gpb.StoppingCriteria(max_new_tokens=64, ignore_eos=True))
        running = stub.GenerateStream(long, timeout=60)
        next(running)
        waiting = [stub.GenerateStream(long, timeout=60) for _ in range(2)]
        assert wait_for(lambda: server.engine.queue_depth() == 2, 5)
        with openai.OpenAI(base_url=url(server), api_key="x", max_retries=0) as client:
            for stream in (False, True):
                status, error = error_of(lambda: client.completions.create(model="base", prompt="Hi", stream=stream))
                assert (status, error["type"]) == (429, "rate_limit_error") and "queue full" in error["message"]
        for call in (running, *waiting):
            call.cancel()
    finally:
        server.stop()


def test_draining_is_503_and_running_streams_finish(smol_fp32, tmp_path):
    server = ServerThread(ServiceConfig(port=0, http_port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                                        grace_seconds=30), engine_config_for_tests(tmp_path / "cache"), smol_fp32)
    with openai.OpenAI(base_url=url(server), api_key="x", max_retries=0, timeout=60) as client:
        in_flight = iter(client.completions.create(model="base", prompt="Hi", max_tokens=24, stream=True,
                                                   extra_body={"ignore_eos": True}))
        first = next(in_flight)
        stopper = threading.Thread(target=server.stop, kwargs=dict(grace=30))
        stopper.start()
        assert wait_for(lambda: server.server.runtime.draining, 5)
        status, error = error_of(lambda: client.completions.create(model="base", prompt="Hi", max_tokens=2))
        assert (status, error["type"]) == (503, "service_unavailable_error") and "shutting down" in error["message"]
        rest = list(in_flight)
        assert rest[-1].choices[0].finish_reason == "length" and len(first.choices[0].text + "".join(
            r.choices[0].text for r in rest)) > 0
        stopper.join(30)
        assert not stopper.is_alive()


def test_readme_curl_against_loraplex_serve(tmp_path):
    """`loraplex serve --http-port` as a process, the README's curl body and its openai example."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text().split("## OpenAI-compatible HTTP", 1)[1]
    body = json.loads(re.search(r"-d '(\{.*?\})'", readme).group(1))
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "loraplex.server.cli", "serve", "--port", "0", "--http-port", "0", "--no-metrics",
               "--quantization", "none", "--state-dir", str(tmp_path / "state"), "--adapter-root", str(EXAMPLES),
               "--max-model-len", "512", "--kv-cache-bytes", str(64 << 20)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stderr=out, stdout=out, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ready = wait_for(lambda: re.search(r"serving on 127.0.0.1:(\d+), OpenAI-compatible HTTP on "
                                           r"http://127.0.0.1:(\d+)/v1", log.read_text()), 240, 0.2)
        assert ready, log.read_text()
        grpc_port, http_port = ready.groups()
        with Client(f"127.0.0.1:{grpc_port}") as client:
            client.register_adapter("caps", str(EXAMPLES / "caps"))
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
        assert answer["model"] == "caps" and answer["choices"][0]["message"]["content"].strip()
        assert answer["system_fingerprint"] == "caps@1" and answer["usage"]["completion_tokens"] <= 32
        example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)  # the openai example, as written
        script = tmp_path / "openai_example.py"
        script.write_text(example.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}"))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()


@pytest.mark.parametrize("header, model, ok", [("caps", "caps", True), ("caps", "caps@1", True),
                                                ("pirate", "caps", False), ("caps", "base", False)])
def test_routing_header_must_name_the_request_s_adapter_http(server, header, model, ok):
    body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 1})
    status, reply = raw(server, "/completions", body, {"x-loraplex-adapter": header})
    if ok:
        assert status == 200, reply
    else:
        assert status == 400 and reply["error"]["param"] == "x-loraplex-adapter", reply
        assert "x-loraplex-adapter" in reply["error"]["message"]


@pytest.mark.parametrize("header, fields, ok", [
    ("caps", dict(adapter="caps"), True), ("pirate, caps", dict(adapters=["caps", "pirate"]), True),
    ("pirate", dict(adapter="caps"), False), ("caps", dict(adapters=["caps", "pirate"]), False),
    ("caps", {}, False)])
def test_routing_header_must_name_the_request_s_adapters_grpc(stub, header, fields, ok):
    if "adapters" in fields:
        fields = dict(adapters=[gpb.AdapterWeight(name=n, weight=0.5) for n in fields["adapters"]])
    request = gpb.GenerateRequest(prompt="Hi", stopping=gpb.StoppingCriteria(max_new_tokens=1), **fields)
    if ok:
        assert stub.Generate(request, metadata=[("x-loraplex-adapter", header)], timeout=60).generated_tokens == 1
        return
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=[("x-loraplex-adapter", header)], timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-loraplex-adapter" in info.value.details()
    assert ("loraplex-field", "x-loraplex-adapter") in (info.value.trailing_metadata() or ())


def test_client_sends_the_routing_header_for_its_adapters():
    from loraplex.client.convert import generate_request, routing_metadata

    assert routing_metadata(generate_request("Hi", adapter="caps")) == (("x-loraplex-adapter", "caps"),)
    assert routing_metadata(generate_request("Hi", adapters={"caps": 0.5, "pirate": 0.5})) == (
        ("x-loraplex-adapter", "caps,pirate"),)
    assert routing_metadata(generate_request("Hi")) == ()
    from loraplex.v1 import adapters_pb2 as apb

    assert routing_metadata(apb.LoadAdapterRequest(name="caps")) == (("x-loraplex-adapter", "caps"),)
    assert routing_metadata(apb.RegisterAdapterRequest(name="caps", source="caps")) == ()
