"""The persistent adapter registry: one immutable copy per version in the state dir, and registry.json.

    <state_dir>/registry.json             names -> version, sha256, source, pin, stats (atomically replaced)
    <state_dir>/adapters/<name>/v<N>/     adapter_config.json + adapter_model.safetensors of that version
    <state_dir>/tmp/                      staging: copies and uploads before they are validated

A registration copies (or receives) the files into staging, validates the copy against the base,
moves it into place, writes registry.json, and only then hands the weights to the engine; any
failure undoes every earlier step, so nothing is ever half-registered. Before copying, a source's
files are checked against the largest size a valid adapter with its config can have and against
the free disk (`min_free_disk_bytes` stays free); a copy stops as soon as its client goes away, and
staging is removed at once on any failure. Versions never repeat, even after a delete; a replaced
or deleted version's folder is removed by `sweep_retired()` once no queued or running request uses
it (requests still running on it may need to reload it). On start, every recorded adapter is
registered again under its own version (pinned ones pinned, so preloaded), and folders no record
names are removed.

Sources may also be remote (hf://, s3://; adapters/remote.py): fetched into staging with the same
bounds, recorded as resolved (a hub revision as its commit) with the weights' sha256 like any other.

Where records and files live is the store's job (adapters/registry_store.py): the state dir by default,
or PostgreSQL plus a shared volume for many replicas (adapters/pg_store.py), whose changes by other
replicas `sync_name` / `sync_all` apply here (adapters/registry_follower.py calls them). With a shared
store, one replica never removes version folders (another may still serve them) nor staging.

Messages name the caller's own paths (its source folder or URL, or the file names of an upload), never the
state dir. An adapter whose config names another base model (of the same shapes) is registered with
a warning (AdapterInfo.warnings, the log), or refused with `strict_base`.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..errors import AdapterMismatch, AdapterNotFound, FailedPrecondition, InvalidAdapter, ResourceExhausted
from .catalog import AdapterEntry
from .loader import load_adapter, max_weights_bytes, rank_over_max
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_CONFIG_BYTES, base_model_warning, read_lora_config
from .registry_store import LocalJsonStore, RegistryStore, fsync_dir
from .remote import RemoteStores, is_remote, open_remote, stage_remote
from .retired import RetiredVersions
from .sources import TooLarge, check_name, copy_source, remove_tree, resolve_source, source_files, stop_if
from .types import check_fits
from .upload import UploadWriter

log = logging.getLogger(__name__)

UPLOAD_SOURCE = "upload"


@dataclass(frozen=True, slots=True)
class AdapterStatus:
    """What AdapterInfo reports: the engine's entry plus where it lives and how it is used."""

    entry: AdapterEntry
    state: str
    """REGISTERED, LOADING, HOST or DEVICE."""
    source: str
    """The folder it was registered from, or "upload"."""
    request_count: int
    last_used: float | None
    """Unix time of its last use, None = never."""
    warnings: tuple[str, ...] = ()
    """What registration noticed but let pass (e.g. another base model named in its config)."""


class AdapterRegistry:
    def __init__(self, engine, state_dir: str | Path, adapter_roots: list[str | Path], max_upload_bytes: int,
                 min_free_disk_bytes: int = 0, strict_base: bool = False, stores: RemoteStores = RemoteStores(),
                 store: RegistryStore | None = None):
        self.engine = engine
        self.store = store if store is not None else LocalJsonStore(state_dir)
        """Records and version folders: the state dir (default) or a store shared by many replicas."""
        self.stores = stores
        """Where hf:// and s3:// sources are fetched from."""
        self.state_dir = Path(state_dir)
        self.roots = [Path(r) for r in adapter_roots]
        self.max_upload_bytes = max_upload_bytes
        self.min_free_disk_bytes = min_free_disk_bytes
        self.strict_base = strict_base
        self._retired = RetiredVersions(lambda timeout: engine.adapter_keys_in_use(timeout=timeout))
        self._lock = threading.RLock()
        self._records: dict[str, dict] = {}
        self._unusable: dict[str, dict] = {}
        """Records that failed to load at start: kept on disk untouched, not served."""
        self._stats_dirty = False
        try:
            for sub in ("adapters", "tmp"):
                (self.store.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            what = "shared adapter dir" if self.store.shared else "state dir"
            raise FailedPrecondition(f"{what} {self.store.root}: cannot be created ({exc.strerror})") from None

    @property
    def path(self) -> Path:
        return self.store.root / "registry.json"

    @property
    def files(self) -> Path:
        """The store's root: version folders under adapters/, staging under tmp/."""
        return self.store.root

    # ---- start ----
    def restore(self) -> list[str]:
        """Register every recorded adapter again under its version; returns the names now served."""
        with self._lock:
            if not self.store.shared:  # shared staging may be another replica's upload in progress
                remove_tree(self.files / "tmp")
                (self.files / "tmp").mkdir(parents=True, exist_ok=True)
            restored = []
            for name, record in sorted(self.store.read_all().records.items()):
                try:
                    self._restore_one(name, record)
                except Exception as exc:  # a damaged copy must not stop the others, nor the server
                    log.error("registry: adapter %s@%s not restored (%s); its record is kept", name,
                              record.get("version"), exc)
                    self._unusable[name] = record
                    continue
                self._records[name] = record
                restored.append(name)
            if not self.store.shared:
                self._remove_unreferenced()
            log.info("registry: %d adapters restored from %s", len(restored), type(self.store).__name__)
            return restored

    def _restore_one(self, name: str, record: dict) -> None:
        """Validate the kept copy as at registration, and check it is the very file that was registered."""
        engine, folder = self.engine, self.files / record["path"]
        if not folder.exists():  # a version another replica registered, kept outside this replica's disk
            self.store.fetch(record["path"], folder)
        weights = load_adapter(folder, engine.arch, engine.config.lora.max_lora_rank, name)
        if record.get("sha256") and weights.sha256 != record["sha256"]:
            raise InvalidAdapter(f"{folder / 'adapter_model.safetensors'} changed on disk since it was registered "
                                 f"(sha256 {weights.sha256[:12]}..., recorded {record['sha256'][:12]}...)")
        record["warnings"] = self._warnings(name, weights)  # --strict-base governs new registrations only
        engine.register_weights(name, replace(weights, source=str(folder)), pin=bool(record.get("pinned")),
                                version=int(record["version"]), registered_at=record.get("registered_at"))

    def _remove_unreferenced(self) -> None:
        keep = {(self.files / r["path"]).resolve() for r in [*self._records.values(), *self._unusable.values()]}
        for folder in (self.files / "adapters").glob("*/v*"):
            if folder.resolve() not in keep:
                remove_tree(folder)
        for folder in (self.files / "adapters").iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    # ---- following a shared store ----
    def sync_name(self, name: str) -> None:
        """Make this replica serve what the store holds for `name` now (another replica changed it)."""
        with self._lock:  # read under the lock: a registration here cannot slip between the read and its apply
            self._apply(name, self.store.read(name))

    def sync_all(self) -> None:
        """Catch up with the whole store (on start, and whenever the database comes back)."""
        with self._lock:
            stored = self.store.read_all().records
            for name in sorted({*self._records, *self._unusable} - set(stored)):
                self._apply(name, None)
            for name, record in sorted(stored.items()):
                self._apply(name, record)

    def _apply(self, name: str, record: dict | None) -> None:
        """Lock held: serve `record` as `name`'s current version (None: unregistered), checking its sha256."""
        current = self._records.get(name) or self._unusable.get(name)
        if record is None:
            if current is not None:
                self._unusable.pop(name, None)
                if self._records.pop(name, None) is not None:
                    self.engine.delete_adapter(name)
                log.info("adapter %s: deleted (by another replica)", name)
            return
        served = self._records.get(name)
        if served is not None and int(served["version"]) == int(record["version"]):
            if bool(served.get("pinned")) != bool(record.get("pinned")):
                served["pinned"] = bool(record.get("pinned"))
                self.engine.pin_adapter(name, served["pinned"])
            return  # (a version that failed here, unusable, is tried again: its store may have been unreachable)
        record = dict(record, request_count=(current or {}).get("request_count", 0),
                      last_used=(current or {}).get("last_used"))
        try:
            self._restore_one(name, record)
        except Exception as exc:  # keep serving what this replica has; the record stays visible as unusable
            log.error("adapter %s@%s: not served here (%s)", name, record.get("version"), exc)
            self._unusable[name] = record
            return
        self._records[name] = record
        self._unusable.pop(name, None)
        log.info("adapter %s: version %s now served (registered by another replica)", name, record["version"])

    def close(self) -> None:
        self.store.close()

    # ---- registration ----
    def register(self, name: str, source: str, pin: bool = False, preload: bool = False,
                 should_stop: Callable[[], bool] | None = None) -> AdapterEntry:
        """From a folder inside the adapter roots, hf://org/repo[@revision] or s3://bucket/prefix.
        `should_stop()`: true once the caller went away; the copy and every later step then stop
        (Cancelled) and leave nothing behind."""
        check_name(name)
        if is_remote(source):
            return self._register_remote(name, source, pin, preload, should_stop)
        folder = resolve_source(source, self.roots)
        engine = self.engine
        config = read_lora_config(folder, name, str(folder))  # size- and depth-bounded
        limits = {ADAPTER_CONFIG: MAX_CONFIG_BYTES,
                  ADAPTER_WEIGHTS: max_weights_bytes(config, engine.arch, engine.config.lora.max_lora_rank)}
        try:
            files = source_files(folder, self.roots, name, limits[ADAPTER_WEIGHTS])
        except TooLarge as too_large:
            raise rank_over_max(config, engine.config.lora.max_lora_rank, name) or too_large from None
        self.check_free(sum(path.stat().st_size for path in files.values()))
        stop_if(should_stop)
        staging = self.new_staging()
        try:
            copy_source(files, staging, limits, should_stop)
        except BaseException:
            remove_tree(staging)
            raise
        return self.register_staged(name, staging, str(folder), pin=pin, preload=preload, should_stop=should_stop,
                                    shown_as=str(folder))

    def check_free(self, num_bytes: int) -> None:
        """ResourceExhausted when writing `num_bytes` more would leave less than min_free_disk_bytes free."""
        free = shutil.disk_usage(self.files / "tmp").free
        if free - num_bytes < self.min_free_disk_bytes:
            raise ResourceExhausted(f"disk: the server's state dir has {free} bytes free; {num_bytes} more would leave "
                                    f"less than the {self.min_free_disk_bytes} bytes it keeps free")

    def new_staging(self) -> Path:
        staging = self.files / "tmp" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        return staging

    def _register_remote(self, name: str, source: str, pin: bool, preload: bool,
                         should_stop: Callable[[], bool] | None) -> AdapterEntry:
        remote = open_remote(source, self.stores)
        stop_if(should_stop)
        staging = self.new_staging()
        try:
            stage_remote(remote, staging, lambda path: self._weights_limit(path, name, remote.shown), self.check_free,
                         should_stop)
        except BaseException:
            remove_tree(staging)
            raise
        return self.register_staged(name, staging, remote.resolved, pin=pin, preload=preload,
                                    should_stop=should_stop, shown_as=remote.shown)

    def _weights_limit(self, config_path: Path, name: str, shown_as: str) -> tuple[int, Exception | None]:
        """(most bytes the weights may have given the staged config, the error that explains a larger file)."""
        config = read_lora_config(config_path.parent, name, shown_as)
        max_rank = self.engine.config.lora.max_lora_rank
        return max_weights_bytes(config, self.engine.arch, max_rank), rank_over_max(config, max_rank, name)

    def upload_writer(self) -> UploadWriter:
        return UploadWriter(self.new_staging(), self.max_upload_bytes,
                            weights_limit=lambda path: self._weights_limit(path, "upload", ""),
                            check_free=self.check_free)

    def _warnings(self, name: str, weights) -> list[str]:
        loaded = getattr(self.engine, "loaded", None)
        if loaded is None:
            return []
        names = (loaded.model_id, str(loaded.model_dir), Path(loaded.model_dir).name)
        warning = base_model_warning(weights.config.get("base_model_name_or_path"), names)
        if warning is None:
            return []
        log.warning("adapter %s: %s", name, warning)
        return [warning]

    def register_staged(self, name: str, staging: Path, source: str, pin: bool = False,
                        preload: bool = False, should_stop: Callable[[], bool] | None = None,
                        shown_as: str = "") -> AdapterEntry:
        """Validate a staged folder, move it into place, persist, then serve it. Consumes `staging`.

        `shown_as`: how messages name the folder (the caller's source; "" for an upload: file names)."""
        final = None
        try:
            check_name(name)
            engine = self.engine
            stop_if(should_stop)
            weights = load_adapter(staging, engine.arch, engine.config.lora.max_lora_rank, name, shown_as=shown_as)
            check_fits(weights, engine.arch, engine.config.lora.max_lora_rank)
            warnings = self._warnings(name, weights)
            if warnings and self.strict_base:
                raise AdapterMismatch(f"adapter {name!r}: {warnings[0]}; this server runs with --strict-base")
            stop_if(should_stop)
            with self._lock:
                version = self.store.next_version(name, after=engine.catalog.last_version(name))
                final = self.files / "adapters" / name / f"v{version}"
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, final)
                fsync_dir(final.parent)
                self.store.publish(final, str(final.relative_to(self.files)))
                previous = self._records.get(name)
                unusable = self._unusable.get(name)
                record = dict(version=version, sha256=weights.sha256, source=source,
                              path=str(final.relative_to(self.files)),
                              pinned=bool(pin), registered_at=time.time(),
                              request_count=previous["request_count"] if previous else 0,
                              last_used=previous["last_used"] if previous else None, warnings=warnings)
                if not self.store.put(name, record):  # another replica's newer version is current already
                    log.info("adapter %s: version %d recorded, and superseded at once by a newer one", name, version)
                    self._apply(name, self.store.read(name))
                    return engine.catalog.get(name)
                self._records[name] = record
                self._unusable.pop(name, None)
                try:
                    entry = engine.register_weights(name, replace(weights, source=str(final)), pin=pin,
                                                    version=version, registered_at=record["registered_at"])
                except BaseException:
                    self._records.pop(name) if previous is None else self._records.__setitem__(name, previous)
                    if unusable is not None:
                        self._unusable[name] = unusable
                    self.store.revert(name, version, previous if previous is not None else unusable)
                    raise
                for old in (previous, unusable):
                    if old is not None:
                        self._retire(f"{name}@{old['version']}", self.files / old["path"])
        except BaseException:
            remove_tree(staging)
            if final is not None and self._records.get(name, {}).get("path") != str(final.relative_to(self.files)):
                remove_tree(final)
            raise
        log.info("adapter %s registered: version %d from %s (%d bytes)", name, version, source, entry.num_bytes)
        if pin:
            engine.run_on_engine_thread(lambda: None)  # the pin happens between steps: wait for it
        elif preload:
            try:
                engine.load_adapter(name)
            except Exception as exc:  # registered all the same; it loads on first use
                log.warning("adapter %s: preload failed (%s)", name, exc)
        return entry

    def delete(self, name: str) -> AdapterEntry:
        with self._lock:
            if name not in self._records and name not in self._unusable:
                raise AdapterNotFound(f"adapter {name!r} is not registered", field="name")
            self.store.remove(name)
            previous = self._records.pop(name, None)
            unusable = self._unusable.pop(name, None)
            old = previous if previous is not None else unusable
            self._retire(f"{name}@{old['version']}", self.files / old["path"])
            if previous is None:  # it failed to load at start: only its record existed
                return AdapterEntry(name=name, version=int(unusable["version"]), source=unusable.get("source", ""),
                                    sha256=unusable.get("sha256", ""), rank=0, alpha=0.0, target_modules=(),
                                    num_bytes=0)
            return replace(self.engine.delete_adapter(name), source=previous.get("source", ""))

    # ---- retired versions ----
    def _retire(self, key: str, folder: Path) -> None:
        """`folder` (of version `key`) is no longer registered; sweep_retired removes it (never in a shared
        store: other replicas may still serve it)."""
        if not self.store.shared:
            self._retired.add(key, folder)

    @property
    def has_retired(self) -> bool:
        return bool(self._retired)

    def sweep_retired(self) -> list[str]:
        """Remove the folders of retired versions that no queued or running request uses; their keys."""
        return self._retired.sweep(self._live_folders)

    def _live_folders(self) -> set[Path]:
        with self._lock:
            return {(self.files / r["path"]).resolve() for r in [*self._records.values(), *self._unusable.values()]}

    def set_pinned(self, name: str, pinned: bool) -> AdapterEntry:
        with self._lock:
            record = self._record(name)
            self.store.set_pinned(name, pinned)
            record["pinned"] = pinned
            entry = self.engine.pin_adapter(name, pinned)
        self.engine.run_on_engine_thread(lambda: None)  # the pin happens between steps: wait for it
        return entry

    def is_registered(self, name: str) -> bool:
        """Whether requests naming `name` resolve now (the engine's catalog, which a registration fills last)."""
        try:
            self.engine.catalog.get(name)
        except AdapterNotFound:
            return False
        return True

    def _record(self, name: str) -> dict:
        record = self._records.get(name)
        if record is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered", field="name")
        return record

    # ---- views and stats ----
    def status(self, name: str) -> AdapterStatus:
        entry = self.engine.catalog.get(name)
        with self._lock:
            record = self._records.get(name, {})
            return AdapterStatus(entry=entry, state=self.engine.cache.state_of(entry.key),
                                 source=record.get("source", entry.source),
                                 request_count=int(record.get("request_count", 0)), last_used=record.get("last_used"),
                                 warnings=tuple(record.get("warnings", ())))

    def list(self) -> list[AdapterStatus]:
        statuses = []
        for entry in self.engine.catalog.list():
            try:
                statuses.append(self.status(entry.name))
            except AdapterNotFound:  # deleted meanwhile
                continue
        return statuses

    def record_use(self, names) -> None:
        """Count a request for each adapter name (persisted with the next save or flush)."""
        now = time.time()
        with self._lock:
            for name in names:
                record = self._records.get(name)
                if record is not None:
                    record["request_count"] = record.get("request_count", 0) + 1
                    record["last_used"] = now
                    self._stats_dirty = True

    def flush_stats(self) -> None:
        with self._lock:
            if self._stats_dirty:
                self.save()

    # ---- persistence ----
    def save(self) -> None:
        """Hand the use counts to the store (the local one rewrites registry.json atomically)."""
        with self._lock:
            records = {**self._unusable, **self._records}
            self.store.save_stats({name: (int(r.get("request_count", 0)), r.get("last_used"))
                                   for name, r in records.items()})
            self._stats_dirty = False
