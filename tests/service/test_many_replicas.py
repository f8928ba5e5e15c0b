"""Many replicas behind a real proxy: Debian's nginx with deploy/nginx/loraplex.conf (its `server` lines pointed
at three `loraplex serve` subprocesses on the embedded model), one shared registry in Debian's PostgreSQL.

Checks: a register through the proxy is served by all three; >= 95% of 300 requests for one adapter land on
one replica (the `x-loraplex-adapter` hash); kill -9 of that replica mid-load fails only the requests in
flight on it and the rest go to the others; a replica started after the registrations serves them all;
the database stopped and started again loses nothing."""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loraplex.client import NO_RETRY, Client, ClientConfig, LoraplexClientError, NotFound, Unavailable

from .conftest import free_port, registers, wait_for
from .real_services import Nginx, Postgres
from .serve_process import Serve

NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "loraplex.conf"
REQUESTS = 300
CONCURRENCY = 4
PROMPT = "Hi"


def proxy_config(grpc_ports: list[int], listen: int) -> str:
    """deploy/nginx/loraplex.conf as shipped, its gRPC upstream on our replicas and its listeners on free ports."""
    text = NGINX_CONF.read_text()
    servers = "".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;\n" for port in grpc_ports)
    text = re.sub(r"(upstream loraplex_grpc \{\n    hash [^\n]+\n)(?:    server [^\n]+\n)+", rf"\g<1>{servers}", text)
    text = re.sub(r"(upstream loraplex_http \{\n    hash [^\n]+\n)(?:    server [^\n]+\n)+",
                  rf"\g<1>    server 127.0.0.1:{free_port()};\n", text)
    text = text.replace("listen 50051 http2;", f"listen 127.0.0.1:{listen} http2;")
    return text.replace("listen 8000;", f"listen 127.0.0.1:{free_port()};")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, adapter_root):
    base = tmp_path_factory.mktemp("many-replicas")
    postgres = Postgres()
    extra = ("--registry-url", postgres.url, "--shared-adapter-dir", str(base / "shared"))

    def start(name: str) -> Serve:
        return Serve(base / f"state-{name}", adapter_root, base / f"{name}.log", extra)
    with ThreadPoolExecutor(3) as pool:
        replicas = list(pool.map(start, "abc"))
    proxy_port = free_port()
    nginx = Nginx(proxy_config([r.port for r in replicas], proxy_port))
    state = dict(postgres=postgres, replicas=replicas, start=start, nginx=nginx,
                 proxy=Client(ClientConfig(target=f"127.0.0.1:{proxy_port}", timeout=60, retry=NO_RETRY)))
    yield state
    state["proxy"].close()
    nginx.close()
    for replica in state["replicas"]:
        if replica.process.poll() is None:
            replica.stop()
    postgres.close()


def counts(replicas, name) -> list[int]:
    return [r.client.get_adapter(name).request_count if r.process.poll() is None else 0 for r in replicas]


def one_token(client, adapter) -> None:
    client.generate(PROMPT, adapter=adapter, max_new_tokens=1, ignore_eos=True)


def test_register_through_the_proxy_is_served_by_all(cluster):
    proxy, replicas = cluster["proxy"], cluster["replicas"]
    proxy.register_adapter("caps", "caps")
    proxy.register_adapter("pirate", "pirate")
    assert wait_for(lambda: all(_has(r.client, "pirate") for r in replicas), timeout=2)
    for replica in replicas:
        one_token(replica.client, "caps")


@pytest.mark.slow
def test_every_adapter_keeps_to_one_replica_under_mixed_load(cluster):
    """Heavier variant: four adapters, 150 one-token requests each, interleaved over 4 clients; each adapter's
    requests keep to one replica (nginx's log: the header it hashed and where the request went)."""
    proxy, nginx = cluster["proxy"], cluster["nginx"]
    names = ["caps", "pirate", "caps_soft", "pirate_soft"]
    for name in names:  # (again, as a new version, when the other tests ran first: `-m slow` runs this alone)
        proxy.register_adapter(name, name)
    assert wait_for(lambda: all(_has(r.client, name) for r in cluster["replicas"] for name in names), timeout=2)
    logged = len(nginx.routed())
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda i: one_token(proxy, names[i % len(names)]), range(150 * len(names))))
    seconds = time.monotonic() - started
    by_adapter: dict[str, dict[str, int]] = {}
    for header, upstream in nginx.routed()[logged:]:
        by_adapter.setdefault(header, {}).setdefault(upstream, 0)
        by_adapter[header][upstream] += 1
    assert set(by_adapter) == set(names)
    for name, landed in by_adapter.items():
        assert max(landed.values()) >= 0.95 * sum(landed.values()), (name, landed)
    print(f"{150 * len(names)} requests over {len(names)} adapters in {seconds:.1f} s: {by_adapter}")


def test_affinity_then_kill_the_replica_mid_load(cluster):
    proxy, replicas = cluster["proxy"], cluster["replicas"]
    before = counts(replicas, "caps")
    logged = len(cluster["nginx"].routed())
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda _: one_token(proxy, "caps"), range(REQUESTS)))
    seconds = time.monotonic() - started
    landed = [after - was for after, was in zip(counts(replicas, "caps"), before)]
    assert sum(landed) == REQUESTS and max(landed) >= 0.95 * REQUESTS, landed
    routed = cluster["nginx"].routed()[logged:]  # nginx saw the header the client sent, and hashed on it
    assert len(routed) == REQUESTS and {header for header, _ in routed} == {"caps"}
    print(f"{REQUESTS} one-token requests through nginx in {seconds:.1f} s, per replica {landed}")

    target = replicas[landed.index(max(landed))]
    others = [r for r in replicas if r is not target]
    others_before = counts(others, "caps")
    outcomes: list[str] = []
    done = threading.Event()

    def client_loop():
        while not done.is_set():
            try:
                one_token(proxy, "caps")
                outcomes.append("ok")
            except LoraplexClientError as exc:
                outcomes.append(type(exc).__name__)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        loops = [pool.submit(client_loop) for _ in range(CONCURRENCY)]
        assert wait_for(lambda: len(outcomes) >= 20, timeout=30)
        target.kill()
        at_kill = len(outcomes)
        wait_for(lambda: len(outcomes) >= at_kill + 60, timeout=60)
        done.set()
        [loop.result() for loop in loops]
    failed = [o for o in outcomes if o != "ok"]
    assert len(failed) <= CONCURRENCY, failed  # only those in flight on the killed replica
    after_kill = outcomes[at_kill + CONCURRENCY:]
    assert after_kill and all(o == "ok" for o in after_kill)
    served_by_others = sum(counts(others, "caps")) - sum(others_before)
    assert served_by_others >= len(after_kill)
    print(f"killed the affine replica: {len(failed)} requests failed ({failed}), {len(after_kill)} later ones "
          "all served by the others")


def test_late_replica_serves_every_registration(cluster):
    late = cluster["start"]("late")
    cluster["replicas"].append(late)
    expected = {(a.name, a.version, a.sha256) for a in cluster["proxy"].list_adapters()}
    assert {(a.name, a.version, a.sha256) for a in late.client.list_adapters()} == expected
    one_token(late.client, "pirate")


def test_database_restart_loses_nothing(cluster):
    proxy, postgres = cluster["proxy"], cluster["postgres"]
    before = {(a.name, a.version, a.sha256, a.pinned) for a in proxy.list_adapters()}
    postgres.stop("fast")
    try:
        with pytest.raises(Unavailable):
            proxy.register_adapter("meanwhile", "caps")
        one_token(proxy, "pirate")  # serving goes on
    finally:
        postgres.start()
    assert wait_for(lambda: registers(proxy, "after", "caps_soft"), timeout=10)
    live = [r for r in cluster["replicas"] if r.process.poll() is None]
    assert wait_for(lambda: all(_has(r.client, "after") for r in live), timeout=3)
    for replica in live:
        assert {(a.name, a.version, a.sha256, a.pinned) for a in replica.client.list_adapters()
                if a.name != "after"} == before


def _has(client, name) -> bool:
    try:
        client.get_adapter(name)
    except NotFound:
        return False
    return True

