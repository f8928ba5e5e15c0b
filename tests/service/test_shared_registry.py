"""One registry for many replicas: three in-process servers on the embedded model sharing a real PostgreSQL
(Debian's, started for this module) and one adapter folder. Every change made through one replica reaches
the others within 2 s; a late replica serves everything; versions are immutable and never torn; losing the
database refuses admin calls with UNAVAILABLE while serving goes on, and nothing is lost."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import psycopg
import pytest
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file, save_file

from loraplex.client import Client, ClientConfig, NotFound, RetryPolicy, Unavailable
from loraplex.server.adapters.sources import ADAPTER_FILES
from loraplex.server.config import ServiceConfig
from loraplex.server.errors import ConfigError

from .conftest import PROMPTS, ServerThread, engine_config_for_tests, free_port, wait_for
from .real_services import Postgres

PROPAGATION_SECONDS = 2.0


@pytest.fixture(scope="module")
def postgres():
    database = Postgres()
    yield database
    database.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-registry")


def start_replica(name, base, postgres, adapter_root, loaded, connected: bool = True, **shared) -> ServerThread:
    """A replica with its own state dir; `shared`: registry_url, shared_adapter_dir... (default: the module's)."""
    shared = dict(dict(registry_url=postgres.url, shared_adapter_dir=str(base / "shared")), **shared)
    service = ServiceConfig(port=0, metrics_port=None, state_dir=str(base / f"state-{name}"),
                            adapter_roots=(str(adapter_root),), **shared)
    replica = ServerThread(service, engine_config_for_tests(base / "cache"), loaded)
    assert not connected or wait_for(replica.server.follower.connected.is_set, timeout=10)
    return replica


@pytest.fixture(scope="module")
def replicas(base, postgres, adapter_root, smol_fp32):
    started = [start_replica(name, base, postgres, adapter_root, smol_fp32) for name in "abc"]
    yield started
    for replica in started:
        if replica.thread.is_alive():
            replica.stop()


@pytest.fixture(scope="module")
def clients(replicas):
    opened = [Client(ClientConfig(target=r.target, timeout=60, retry=RetryPolicy(max_attempts=1))) for r in replicas]
    yield opened
    for client in opened:
        client.close()


def version_on(client, name) -> int | None:
    try:
        return client.get_adapter(name).version
    except NotFound:
        return None


def tokens(client, adapter) -> list[int]:
    reply = client.generate(messages=[{"role": "user", "content": PROMPTS[2]}], adapter=adapter, max_new_tokens=6,
                            ignore_eos=True, temperature=0)
    return list(reply.token_ids)


def reached_all(clients, name, version, timeout=PROPAGATION_SECONDS) -> float:
    """Seconds until every client's server reports `name` at `version` (None: unregistered); fails past timeout."""
    started = time.monotonic()
    assert wait_for(lambda: all(version_on(c, name) == version for c in clients), timeout=timeout), \
        [version_on(c, name) for c in clients]
    return time.monotonic() - started


def test_register_upload_pin_delete_reach_every_replica(clients, adapter_root):
    a, b, c = clients
    a.register_adapter("caps", "caps")
    seconds = [reached_all(clients, "caps", 1)]
    assert len({c.get_adapter("caps").sha256 for c in clients}) == 1
    assert tokens(a, "caps") == tokens(b, "caps") == tokens(c, "caps") != tokens(a, "")
    b.upload_adapter("pirate", adapter_root / "pirate")
    seconds.append(reached_all(clients, "pirate", 1))
    c.pin_adapter("pirate")
    assert wait_for(lambda: all(x.get_adapter("pirate").pinned for x in clients), timeout=PROPAGATION_SECONDS)
    a.register_adapter("caps", "caps_soft")  # a new version replaces the old one everywhere
    seconds.append(reached_all(clients, "caps", 2))
    assert tokens(b, "caps") == tokens(a, "caps") == tokens(c, "caps")
    c.delete_adapter("pirate")
    seconds.append(reached_all(clients, "pirate", None))
    print("register, upload, new version, delete reached every replica in " + ", ".join(f"{s:.2f}" for s in seconds)
          + " s")


@pytest.mark.parametrize("fields, words", [
    (dict(registry_url="mysql://db/x", shared_adapter_dir="/x"), "registry_url must start with postgresql://"),
    (dict(registry_url="postgresql://db/x"), "registry_url and shared_adapter_dir go together"),
    (dict(shared_adapter_dir="/x"), "registry_url and shared_adapter_dir go together")])
def test_shared_registry_settings_are_checked(fields, words):
    with pytest.raises(ConfigError, match=words):
        ServiceConfig(**fields)


def test_two_admins_at_once_get_distinct_versions(clients, postgres):
    a, b, _ = clients
    for round_ in range(3):
        gate = threading.Barrier(2)

        def register(client, source):
            gate.wait()
            return client.register_adapter("race", source)
        with ThreadPoolExecutor(2) as pool:
            done = [pool.submit(register, a, "caps_soft"), pool.submit(register, b, "pirate_soft")]
            [future.result() for future in done]
        reached_all(clients, "race", 2 * round_ + 2)
    with psycopg.connect(postgres.url) as conn:
        rows = conn.execute("SELECT version, sha256 FROM loraplex_adapter_versions WHERE name = 'race' "
                            "ORDER BY version").fetchall()
    assert [version for version, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert len({sha for _, sha in rows}) == 2  # each version holds one of the two sources, whole
    assert len({x.get_adapter("race").sha256 for x in clients}) == 1


def test_late_replica_serves_everything(clients, base, postgres, adapter_root, smol_fp32):
    late = start_replica("late", base, postgres, adapter_root, smol_fp32)
    try:
        with Client(ClientConfig(target=late.target, timeout=60)) as client:
            expected = {(x.name, x.version, x.sha256) for x in clients[0].list_adapters()}
            assert {(x.name, x.version, x.sha256) for x in client.list_adapters()} == expected and expected
            assert tokens(client, "caps") == tokens(clients[0], "caps")
    finally:
        late.stop()


def test_a_version_whose_bytes_changed_is_not_served(clients, base, postgres, adapter_root, smol_fp32):
    clients[0].register_adapter("tamper", "caps")
    reached_all(clients, "tamper", 1)
    weights = base / "shared" / "adapters" / "tamper" / "v1" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 2 for k, v in tensors.items()}, str(weights))  # a valid adapter, other bytes
    late = start_replica("tampered", base, postgres, adapter_root, smol_fp32)
    try:
        with Client(ClientConfig(target=late.target, timeout=60)) as client:
            assert version_on(client, "tamper") is None  # sha256 differs from the record: refused
            assert version_on(client, "caps") == 2
        assert all(version_on(x, "tamper") == 1 for x in clients)  # what they hold is untouched
    finally:
        late.stop()
        clients[0].delete_adapter("tamper")


def test_database_loss_refuses_admin_keeps_serving_and_catches_up(clients, postgres, base, adapter_root, smol_fp32):
    a, b, c = clients
    before = {(x.name, x.version, x.sha256, x.pinned) for x in a.list_adapters()}
    expected = tokens(b, "caps")
    postgres.stop("immediate")  # as a crash: what was committed must come back from the WAL
    try:
        with pytest.raises(Unavailable, match="registry database"):
            a.register_adapter("during", "pirate")
        with pytest.raises(Unavailable, match="registry database"):
            b.delete_adapter("caps")
        assert tokens(b, "caps") == expected and tokens(c, "caps") == expected  # serving goes on
        assert {(x.name, x.version, x.sha256, x.pinned) for x in c.list_adapters()} == before
        blind = start_replica("blind", base, postgres, adapter_root, smol_fp32, connected=False)  # starts empty
    finally:
        postgres.start()
    c.register_adapter("after", "pirate")  # at once: c's connection, broken by the restart, is replaced first
    seconds = reached_all(clients, "after", 1, timeout=PROPAGATION_SECONDS + 3)  # followers reconnect first
    assert {(x.name, x.version, x.sha256, x.pinned) for x in c.list_adapters() if x.name != "after"} == before
    assert version_on(b, "during") is None
    try:
        with Client(ClientConfig(target=blind.target, timeout=60)) as late:  # caught up once the database was back
            expected = {(x.name, x.version, x.sha256, x.pinned) for x in a.list_adapters()}
            assert wait_for(lambda: {(x.name, x.version, x.sha256, x.pinned) for x in late.list_adapters()} == expected,
                            timeout=PROPAGATION_SECONDS + 3)
    finally:
        blind.stop()
    print(f"after the database came back: a registration reached every replica in {seconds:.2f} s")



def test_versions_in_s3_reach_replicas_without_a_shared_volume(postgres, base, adapter_root, smol_fp32):
    """--shared-adapter-dir s3://...: moto's S3 server on 127.0.0.1, a database of its own, two replicas that
    share no folder; a tampered object is refused by the replica that downloads it."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                               AWS_DEFAULT_REGION="us-east-1").items():
            patch.setenv(key, value)
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        s3.start()
        endpoint = "http://%s:%d" % s3.get_host_and_port()
        bucket = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        bucket.create_bucket(Bucket="loraplex-shared")
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE s3registry")
        shared = dict(registry_url=postgres.url.rsplit("/", 1)[0] + "/s3registry",
                      shared_adapter_dir="s3://loraplex-shared/versions", s3_endpoint_url=endpoint)
        started = [start_replica(f"s3-{n}", base, postgres, adapter_root, smol_fp32, **shared) for n in "ab"]
        try:
            with Client(ClientConfig(target=started[0].target, timeout=60)) as a, \
                    Client(ClientConfig(target=started[1].target, timeout=60)) as b:
                a.register_adapter("caps", "caps")
                reached_all([a, b], "caps", 1)
                assert tokens(a, "caps") == tokens(b, "caps") and a.get_adapter("caps").sha256 == b.get_adapter(
                    "caps").sha256
                keys = {o["Key"] for o in bucket.list_objects_v2(Bucket="loraplex-shared")["Contents"]}
                assert keys == {f"versions/adapters/caps/v1/{f}" for f in ADAPTER_FILES}
                assert (base / "state-s3-b" / "adapters" / "caps" / "v1" / "adapter_model.safetensors").exists()
                bucket.upload_file(str(adapter_root / "caps_soft" / "adapter_model.safetensors"), "loraplex-shared",
                                   "versions/adapters/caps/v1/adapter_model.safetensors")  # other bytes, same name
                started.append(start_replica("s3-c", base, postgres, adapter_root, smol_fp32, **shared))
                with Client(ClientConfig(target=started[2].target, timeout=60)) as c:
                    assert version_on(c, "caps") is None  # sha256 differs from the record: refused
        finally:
            for replica in started:
                replica.stop()
            s3.stop()
