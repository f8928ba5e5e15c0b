"""Chaos (issue 12): kill -9 a real `loraplex serve` at random moments while clients register and upload
adapters concurrently, restart it, and check that every acknowledged registration is there (same version,
same sha256), that whatever else landed is complete and served, and that nothing half-made is left
(no staging, no version folder without its record, registry.json readable).

CI runs CHAOS_ROUNDS (default 3) kill rounds; LORAPLEX_CHAOS_ROUNDS=N runs more (README "Tests")."""
from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import grpc

from loraplex.client import LoraplexClientError
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import generation_pb2 as gpb

from .conftest import chat_request
from .serve_process import Serve

CHAOS_ROUNDS = int(os.environ.get("LORAPLEX_CHAOS_ROUNDS", "3"))
WORKERS = 4
SOURCES = ("caps", "pirate", "caps_soft", "pirate_soft")


def check_state(serve: Serve, state: Path, acked: dict[str, tuple[int, str]]) -> dict[str, apb.AdapterInfo]:
    """Every acknowledged registration kept; everything recorded complete and served; nothing half-made."""
    listed = {a.name: a for a in serve.client.stubs.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    for name, (version, sha) in acked.items():
        assert name in listed, f"acknowledged registration {name} lost"
        assert (listed[name].version, listed[name].sha256) == (version, sha) or (
            name.startswith("shared") and listed[name].version >= version), (name, listed[name], version)
    registry = json.loads((state / "registry.json").read_text())
    assert set(registry["adapters"]) == set(listed)  # every record restored: none damaged or half-written
    paths = {record["path"] for record in registry["adapters"].values()}
    on_disk = {p.relative_to(state).as_posix() for p in (state / "adapters").glob("*/v*")}
    assert on_disk == paths, (on_disk ^ paths)
    assert not list((state / "tmp").iterdir())
    for record in registry["adapters"].values():
        folder = state / record["path"]
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    return listed


def traffic(serve: Serve, root: Path, worker: int, round_: int, acked: dict, lock: threading.Lock,
            stop: threading.Event) -> None:
    rng = random.Random(round_ * 100 + worker)
    i = 0
    while not stop.is_set():
        source = rng.choice(SOURCES)
        name = f"shared{worker}" if rng.random() < 0.25 else f"r{round_}-w{worker}-{i}"
        i += 1
        try:
            if rng.random() < 0.5:
                info = serve.client.stubs.adapters.RegisterAdapter(
                    apb.RegisterAdapterRequest(name=name, source=source), timeout=30).adapter
            else:
                info = serve.client.upload_adapter(name, root / source, timeout=30)
        except (grpc.RpcError, LoraplexClientError):
            if serve.process.poll() is not None:
                return
            continue
        with lock:
            acked[name] = (info.version, info.sha256)


def test_kill_9_during_concurrent_registers_and_uploads(adapter_root, tmp_path):
    state, log = tmp_path / "state", tmp_path / "serve.log"
    rng = random.Random(12)
    acked: dict[str, tuple[int, str]] = {}
    lock = threading.Lock()
    serve = Serve(state, adapter_root, log)
    try:
        for round_ in range(CHAOS_ROUNDS):
            stop = threading.Event()
            threads = [threading.Thread(target=traffic, args=(serve, adapter_root, w, round_, acked, lock, stop))
                       for w in range(WORKERS)]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.5, 3.0))  # a random moment in the middle of copies, checks and renames
            serve.kill()
            stop.set()
            for thread in threads:
                thread.join(60)
            serve = Serve(state, adapter_root, log)
            with lock:
                snapshot = dict(acked)
            listed = check_state(serve, state, snapshot)
            print(f"round {round_}: {len(snapshot)} acknowledged, {len(listed)} registered after kill -9")
        assert acked, "no registration was acknowledged: the kills came too early to test anything"
        name = sorted(n for n in acked if not n.startswith("shared"))[0]
        stopping = gpb.StoppingCriteria(max_new_tokens=2, ignore_eos=True)
        reply = serve.client.stubs.generation.Generate(chat_request("Name a color.", adapter=name, stopping=stopping))
        assert reply.generated_tokens == 2 and reply.adapter_version.startswith(name)
        assert serve.stop() == 0
    finally:
        if serve.process.poll() is None:
            serve.process.kill()
            serve.process.wait()
