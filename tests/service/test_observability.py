"""The shipped observability files against the real thing: Debian's Prometheus (installed here when missing)
scrapes a real server under a short mixed load, and every query of deploy/grafana/loraplex.json returns data;
`promtool check config` accepts deploy/prometheus/prometheus.yml."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from loraplex.server.config import ServiceConfig
from loraplex.client import Client, ClientConfig
from loraplex.v1 import generation_pb2 as gpb

from ..debian_packages import debian_binary
from .conftest import ServerThread, chat_request, engine_config_for_tests, free_port, register_examples, wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "loraplex.json"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
NAMES = ("caps", "pirate", "caps_soft", "pirate_soft")
RATE_INTERVAL = "30s"
"""What Grafana's $__rate_interval comes to at a 1 s scrape interval and a short time range, with room."""


@pytest.fixture(scope="module")
def server(smol_fp32, adapter_root, tmp_path_factory):
    """Two device slots and two host copies for four adapters: the round-robin load below hits, misses (loads
    from disk) and evicts."""
    base = tmp_path_factory.mktemp("observability")
    engine_config = engine_config_for_tests(base / "cache")
    engine_config = dataclasses.replace(engine_config, lora=dataclasses.replace(engine_config.lora, max_loras=2,
                                                                                    max_cpu_loras=2,
                                                                                    max_adapters_per_request=2))
    service = ServiceConfig(port=0, metrics_port=0, state_dir=str(base / "state"), adapter_roots=(str(adapter_root),))
    running = ServerThread(service, engine_config, smol_fp32)
    register_examples(running.target, NAMES)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Debian's Prometheus on 127.0.0.1 with the shipped config, its target the test server, 1 s scrapes."""
    binary = debian_binary("prometheus", "prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{server.server.metrics_port}"]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "wb")
    process = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                                f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200
        except OSError:
            return process.poll() is not None  # exited: fail below with its log
    try:
        assert wait_for(ready, 60, 0.2) and process.poll() is None, (work / "prometheus.log").read_text()[-3000:]
        yield url
    finally:
        process.terminate()
        process.wait(20)
        log.close()


def query(url: str, expr: str) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr})
    reply = json.loads(urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=10).read())
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def _load(target: str, seconds: float, at_least: int, cap: float = 90.0) -> int:
    """Three clients for `seconds`, and on until `at_least` requests went out (a busy CI machine serves fewer per
    second; `cap` seconds at most): every adapter, the base model, a mix, and a NOT_FOUND now and then."""
    started = time.monotonic()
    stop_at = started + seconds
    errors: list[BaseException] = []
    sent = [0]

    def client_loop(offset: int) -> None:
        with Client(ClientConfig(target=target, timeout=60)) as client:
            i = offset
            while (time.monotonic() < stop_at or sent[0] < at_least) and time.monotonic() < started + cap:
                kind = i % 7
                fields = ({"adapter": NAMES[kind]} if kind < 4 else {"adapter": "no-such-adapter"} if kind == 4
                          else {"adapters": [gpb.AdapterWeight(name="caps", weight=0.5)]} if kind == 5 else {})
                stopping = gpb.StoppingCriteria(max_new_tokens=6, ignore_eos=True)
                try:
                    client.stubs.generation.Generate(chat_request("Name a color.", stopping=stopping, **fields))
                except grpc.RpcError as exc:
                    if kind != 4 or exc.code() != grpc.StatusCode.NOT_FOUND:
                        errors.append(exc)
                sent[0] += 1
                i += 3

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return sent[0]


def test_promtool_accepts_the_shipped_config():
    promtool = debian_binary("promtool", "prometheus")
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_query_returns_data_from_a_live_server(server, prometheus):
    assert _load(server.target, 6.0, at_least=14) >= 14  # two of each of the seven kinds
    assert wait_for(lambda: query(prometheus, 'up{job="loraplex"} == 1'), 10)
    time.sleep(2.5)  # two more scrapes after the last request
    empty = []
    for title, expr in dashboard_queries():
        result = query(prometheus, expr.replace("$__rate_interval", RATE_INTERVAL))
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            empty.append((title, expr, values))
    assert not empty, empty
    per_adapter = query(prometheus, f"sum by (adapter) (rate(loraplex_generated_tokens_total[{RATE_INTERVAL}]))")
    assert {r["metric"]["adapter"] for r in per_adapter} >= {"base", "mix", *NAMES}
    evictions = query(prometheus, "loraplex_adapter_cache_evictions_total")
    assert float(evictions[0]["value"][1]) > 0  # four adapters over two slots


def test_held_adapters_gauge_names_each_tier_s_versions(server):
    """loraplex_adapters_held_info: what a smarter router reads to prefer the replica holding an adapter."""
    with Client(ClientConfig(target=server.target, timeout=60)) as client:
        version = client.pin_adapter("caps").version  # pinned: in a device slot until unpinned (2 slots here)
        try:
            held = {}
            for key in server.metrics():
                if key.startswith("loraplex_adapters_held_info{"):
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
                    held[labels["tier"]] = set(filter(None, labels["adapters"].split(",")))
        finally:
            client.unpin_adapter("caps")
        assert set(held) == {"device", "host"} and f"caps@{version}" in held["device"]
        assert all(key.partition("@")[0] in NAMES for keys in held.values() for key in keys)
