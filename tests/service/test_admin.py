"""The Adapters service and the persistent registry on an in-process server: lifecycle, confinement,
uploads, versions while requests run, admin work under traffic, restart."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from loraplex.client import Client, ClientConfig
from loraplex.server.adapters.registry import AdapterRegistry
from loraplex.server.config import ServiceConfig
from loraplex.server.errors import FailedPrecondition
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import generation_pb2 as gpb

from .conftest import PROMPTS, ServerThread, chat_request, engine_config_for_tests, wait_for

MAX_UPLOAD = 5 << 20


def request(adapter="", tokens=6, prompt=PROMPTS[1]):
    return chat_request(prompt, adapter=adapter, stopping=gpb.StoppingCriteria(max_new_tokens=tokens, ignore_eos=True))


def service_config(state_dir, adapter_root) -> ServiceConfig:
    return ServiceConfig(port=0, metrics_port=None, state_dir=str(state_dir), adapter_roots=(str(adapter_root),),
                         max_upload_bytes=MAX_UPLOAD)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    base = tmp_path_factory.mktemp("admin")
    return dict(state=base / "state", cache=base / "cache")


@pytest.fixture(scope="module")
def server(smol_fp32, adapter_root, paths):
    running = ServerThread(service_config(paths["state"], adapter_root), engine_config_for_tests(paths["cache"]),
                           smol_fp32)
    yield running
    if running.thread.is_alive():
        running.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(ClientConfig(target=server.target, timeout=120)) as c:
        yield c


def register(client, name, source, **options):
    request = apb.RegisterAdapterRequest(name=name, source=source, **options)
    return client.stubs.adapters.RegisterAdapter(request).adapter


def get(client, name):
    return client.stubs.adapters.GetAdapter(apb.GetAdapterRequest(name=name)).adapter


def names(client) -> list[tuple[str, int]]:
    return [(a.name, a.version) for a in client.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters]


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_lifecycle_register_load_pin_unload_delete(client, server, adapter_root, paths):
    config = json.loads((adapter_root / "caps" / "adapter_config.json").read_text())
    info = register(client, "caps", "caps")
    assert (info.name, info.version, info.rank, info.alpha, info.pinned) == ("caps", 1, config["r"],
                                                                             config["lora_alpha"], False)
    assert info.source == str(adapter_root / "caps") and info.size_bytes > 0 and info.registered_at.seconds > 0
    assert info.sha256 == hashlib.sha256((adapter_root / "caps" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert set(info.target_modules) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert info.state == apb.HOST
    assert (paths["state"] / "adapters" / "caps" / "v1" / "adapter_model.safetensors").is_file()
    loaded = client.stubs.adapters.LoadAdapter(apb.LoadAdapterRequest(name="caps")).adapter
    assert loaded.state == apb.DEVICE
    pinned = client.stubs.adapters.PinAdapter(apb.PinAdapterRequest(name="caps")).adapter
    assert pinned.pinned and pinned.state == apb.DEVICE
    error = rpc_error(lambda: client.stubs.adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="caps")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "pinned" in error.details()
    assert not client.stubs.adapters.UnpinAdapter(apb.UnpinAdapterRequest(name="caps")).adapter.pinned
    unloaded = client.stubs.adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="caps")).adapter
    assert unloaded.state == apb.REGISTERED
    used = client.stubs.generation.Generate(request("caps"))  # reloads from the state dir on use
    assert used.adapter_version == "caps@1" and get(client, "caps").request_count == 1
    assert get(client, "caps").last_used.seconds > 0
    register(client, "pirate", str(adapter_root / "pirate"), pin=True)
    assert get(client, "pirate").pinned and get(client, "pirate").state == apb.DEVICE
    register(client, "temp", "caps_soft", preload=True)
    assert get(client, "temp").state == apb.DEVICE
    deleted = client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name="temp")).adapter
    assert (deleted.name, deleted.version) == ("temp", 1)
    assert rpc_error(lambda: get(client, "temp")).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: client.stubs.generation.Generate(request("temp"))).code() == grpc.StatusCode.NOT_FOUND
    for call in (lambda: client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name="temp")),
                 lambda: client.stubs.adapters.PinAdapter(apb.PinAdapterRequest(name="nope")),
                 lambda: client.stubs.adapters.LoadAdapter(apb.LoadAdapterRequest(name="nope"))):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and ("temp" in error.details() or "nope" in error.details())
    assert names(client) == [("caps", 1), ("pirate", 1)]
    registry = json.loads((paths["state"] / "registry.json").read_text())
    assert set(registry["adapters"]) == {"caps", "pirate"} and registry["adapters"]["pirate"]["pinned"]
    assert registry["last_versions"]["temp"] == 1


@pytest.fixture(scope="module")
def escapes(adapter_root, tmp_path_factory):
    """Inside the root: `escape`, a symlink to a folder outside; `escape_file`, a folder whose weights
    file is a symlink to a file outside."""
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapter_root / "caps", outside / "caps")
    (adapter_root / "escape").symlink_to(outside / "caps")
    (adapter_root / "escape_file").mkdir()
    shutil.copy(adapter_root / "caps" / "adapter_config.json", adapter_root / "escape_file")
    weights = outside / "caps" / "adapter_model.safetensors"
    (adapter_root / "escape_file" / "adapter_model.safetensors").symlink_to(weights)
    yield
    (adapter_root / "escape").unlink()
    shutil.rmtree(adapter_root / "escape_file")


@pytest.mark.parametrize("name, source, code, words", [
    ("bad name!", "caps", "INVALID_ARGUMENT", "name"),
    ("x", "", "INVALID_ARGUMENT", "source"),
    ("x", "/etc", "INVALID_ARGUMENT", "outside the adapter roots"),
    ("x", "../caps", "INVALID_ARGUMENT", ".."),
    ("x", "escape", "INVALID_ARGUMENT", "symlink"),
    ("x", "escape_file", "INVALID_ARGUMENT", "symlink"),
    ("x", "missing", "INVALID_ARGUMENT", "not a folder"),
    ("x", "broken/pickle", "INVALID_ARGUMENT", "pickle"),
    ("x", "broken/other_base", "FAILED_PRECONDITION", "shape"),
    ("x", "broken/rank_over_max", "FAILED_PRECONDITION", "max"),
    ("x", "broken/unknown_target", "FAILED_PRECONDITION", "qkv_proj"),
    ("x", "broken/nan", "INVALID_ARGUMENT", "non-finite"),
])
def test_refused_sources_leave_nothing_behind(server, client, escapes, paths, name, source, code, words):
    # an earlier test's deleted version is removed in the background: let it go before the folder is listed
    assert wait_for(lambda: not server.server.runtime.registry.has_retired, 10)
    before, files = names(client), sorted(p.name for p in (paths["state"] / "adapters").iterdir())
    error = rpc_error(lambda: register(client, name, source))
    assert error.code().name == code and words in error.details()
    # nothing added; folders may only go (a deleted adapter's files are swept once unused, at any moment)
    assert names(client) == before and {p.name for p in (paths["state"] / "adapters").iterdir()} <= set(files)
    assert not list((paths["state"] / "tmp").iterdir())
    assert client.stubs.generation.Generate(request("caps", tokens=1)).generated_tokens == 1  # still serving


def _upload_messages(folder, name="up", **options):
    yield apb.UploadAdapterRequest(name=name, **options)
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (folder / file_name).read_bytes()
        for start in range(0, len(data), 1 << 20):
            yield apb.UploadAdapterRequest(file_name=file_name, data=data[start:start + (1 << 20)])


def test_upload_serves_exactly_like_the_folder(client, adapter_root, paths):
    info = client.upload_adapter("uploaded", adapter_root / "pirate_soft", pin=True)
    assert (info.name, info.version, info.source, info.pinned) == ("uploaded", 1, "upload", True)
    register(client, "pirate_soft", "pirate_soft")
    via_upload = client.stubs.generation.Generate(request("uploaded", tokens=8))
    via_folder = client.stubs.generation.Generate(request("pirate_soft", tokens=8))
    assert via_upload.token_ids == via_folder.token_ids and via_upload.adapter_version == "uploaded@1"
    assert get(client, "uploaded").sha256 == get(client, "pirate_soft").sha256
    assert not list((paths["state"] / "tmp").iterdir())


@pytest.mark.parametrize("messages, field", [
    (lambda root: [apb.UploadAdapterRequest(file_name="adapter_config.json", data=b"{}")], "name"),
    (lambda root: [], "name"),
    (lambda root: [apb.UploadAdapterRequest(name="up"), apb.UploadAdapterRequest(file_name="../x", data=b"1")],
     "file_name"),
    (lambda root: [apb.UploadAdapterRequest(name="up"), apb.UploadAdapterRequest(data=b"1")], "file_name"),
    (lambda root: [apb.UploadAdapterRequest(name="up")] + [apb.UploadAdapterRequest(
        file_name="adapter_model.safetensors", data=b"\0" * (1 << 20))] * 6, "data"),
    (lambda root: list(_upload_messages(root / "broken" / "corrupt")), "safetensors"),
    (lambda root: list(_upload_messages(root / "caps"))[:2], "adapter_model.safetensors"),
    (lambda root: [apb.UploadAdapterRequest(name="up")], "data"),
])
def test_bad_uploads_are_refused_and_cleaned_up(client, adapter_root, paths, messages, field):
    before = names(client)
    error = rpc_error(lambda: client.stubs.adapters.UploadAdapter(iter(messages(adapter_root))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.details(), error.details()
    assert names(client) == before and not list((paths["state"] / "tmp").iterdir())


def test_new_version_while_a_request_runs(client, server, adapter_root):
    register(client, "live", "caps")
    v1_alone = client.stubs.generation.Generate(request("live", tokens=12))
    stream = client.stubs.generation.GenerateStream(request("live", tokens=12))
    first = next(stream)
    v2 = register(client, "live", "pirate")
    assert v2.version == 2 and v2.source == str(adapter_root / "pirate")
    rest = [first, *stream]
    assert [t for m in rest for t in m.token_ids] == list(v1_alone.token_ids)
    assert rest[-1].adapter_version == "live@1"
    v2_reply = client.stubs.generation.Generate(request("live", tokens=12))
    assert v2_reply.adapter_version == "live@2" and v2_reply.token_ids != v1_alone.token_ids


def test_register_upload_delete_while_traffic_runs(client, server, adapter_root):
    plan = [("", PROMPTS[0]), ("caps", PROMPTS[1]), ("pirate", PROMPTS[2]), ("caps", PROMPTS[3])]
    expected = {item: client.stubs.generation.Generate(request(item[0], 8, item[1])).token_ids for item in plan}
    stop, results, errors = threading.Event(), [], []

    def traffic(item):
        while not stop.is_set():
            try:
                results.append((item, client.stubs.generation.Generate(request(item[0], 8, item[1])).token_ids))
            except grpc.RpcError as exc:  # pragma: no cover - reported below
                errors.append((item, exc.code(), exc.details()))

    with ThreadPoolExecutor(len(plan)) as pool:
        for item in plan:
            pool.submit(traffic, item)
        for i in range(3):
            register(client, f"churn{i}", "caps_soft")
            client.upload_adapter(f"churn-up{i}", adapter_root / "pirate")
            assert client.stubs.generation.Generate(request(f"churn-up{i}", 2)).generated_tokens == 2
            client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name=f"churn{i}"))
            client.stubs.adapters.DeleteAdapter(apb.DeleteAdapterRequest(name=f"churn-up{i}"))
        wait_for(lambda: len(results) >= 12, 60)
        stop.set()
    assert not errors and len(results) >= 12
    assert all(tokens == expected[item] for item, tokens in results)
    assert not [n for n, _ in names(client) if n.startswith("churn")]


def test_restart_restores_versions_pins_and_stats(client, server, smol_fp32, adapter_root, paths):
    before = {a.name: a for a in client.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    outputs = {name: client.stubs.generation.Generate(request(name, 8)).token_ids for name in before}
    counts = {name: get(client, name).request_count for name in before}
    server.stop()
    restarted = ServerThread(service_config(paths["state"], adapter_root), engine_config_for_tests(paths["cache"]),
                             smol_fp32)
    try:
        with Client(ClientConfig(target=restarted.target, timeout=60)) as again:
            after = {a.name: a for a in again.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
            assert {n: (a.version, a.sha256, a.pinned, a.source, a.registered_at) for n, a in after.items()} == {
                n: (a.version, a.sha256, a.pinned, a.source, a.registered_at) for n, a in before.items()}
            assert {n: a.request_count for n, a in after.items()} == counts
            assert all(a.state == apb.DEVICE for a in after.values() if a.pinned)
            for name, tokens in outputs.items():
                assert again.stubs.generation.Generate(request(name, 8)).token_ids == tokens
            assert register(again, "live", "caps").version == 3
        leftovers = {p.relative_to(paths["state"]).as_posix() for p in (paths["state"] / "adapters").glob("*/v*")}
        assert "adapters/live/v1" not in leftovers and "adapters/live/v3" in leftovers  # old versions: cleaned at start
    finally:
        restarted.stop()


def test_unreadable_registry_refuses_to_start(smol_fp32, tmp_path, adapter_root):
    from loraplex.server.engine.engine import Engine

    state = tmp_path / "state"
    state.mkdir()
    (state / "registry.json").write_text("{ not json")
    engine = Engine(engine_config_for_tests(tmp_path / "cache"), loaded=smol_fp32)
    with pytest.raises(FailedPrecondition, match="registry.json cannot be read"):
        AdapterRegistry(engine, state, [adapter_root], MAX_UPLOAD).restore()
    assert (state / "registry.json").read_text() == "{ not json"  # never overwritten
    engine.stop()


def test_damaged_copy_is_skipped_and_kept(smol_fp32, tmp_path, adapter_root):
    from loraplex.server.engine.engine import Engine

    engine = Engine(engine_config_for_tests(tmp_path / "cache"), loaded=smol_fp32)
    registry = AdapterRegistry(engine, tmp_path / "state", [adapter_root], MAX_UPLOAD)
    registry.restore()
    registry.register("good", "caps")
    registry.register("hurt", "pirate")
    engine.stop()
    weights = tmp_path / "state" / "adapters" / "hurt" / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    swapped = tmp_path / "state" / "adapters" / "good" / "v1" / "adapter_model.safetensors"
    original = swapped.read_bytes()
    swapped.write_bytes((adapter_root / "pirate" / "adapter_model.safetensors").read_bytes())  # valid, not its own
    engine = Engine(engine_config_for_tests(tmp_path / "cache"), loaded=smol_fp32)
    registry = AdapterRegistry(engine, tmp_path / "state", [adapter_root], MAX_UPLOAD)
    assert registry.restore() == []  # a replaced file is not served as if it were the registered one
    engine.stop()
    swapped.write_bytes(original)
    engine = Engine(engine_config_for_tests(tmp_path / "cache"), loaded=smol_fp32)
    registry = AdapterRegistry(engine, tmp_path / "state", [adapter_root], MAX_UPLOAD)
    assert registry.restore() == ["good"]
    assert "hurt" in json.loads(registry.path.read_text())["adapters"] and weights.exists()
    registry.save()
    assert "hurt" in json.loads(registry.path.read_text())["adapters"]  # kept until deleted on purpose
    assert registry.delete("hurt").version == 1
    assert "hurt" not in json.loads(registry.path.read_text())["adapters"]
    engine.stop()
