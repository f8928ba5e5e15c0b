"""Where the adapter registry's records live: the `RegistryStore` seam, and the local JSON store (the default).

A record is the dict registry.py writes for one name's current version (version, sha256, source, path,
pinned, registered_at, warnings, stats). Its `path` is relative to the store's `root`, under which the
version folders (`adapters/<name>/v<N>`) and the staging folder (`tmp/`) live. The local store keeps one
replica's registry in its state dir (registry.json, replaced atomically); a shared store
(adapters/pg_store.py) keeps records in PostgreSQL and files on a volume every replica mounts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import FailedPrecondition

FORMAT = 1


@dataclass(frozen=True, slots=True)
class StoredRegistry:
    """Every name's current record, and the highest version each name ever had (versions never repeat)."""

    records: dict[str, dict] = field(default_factory=dict)
    last_versions: dict[str, int] = field(default_factory=dict)


class RegistryStore(Protocol):
    root: Path
    """Version folders are `root/adapters/<name>/v<N>`; staging is `root/tmp`."""
    shared: bool
    """Other replicas write this store too: files are never removed by one of them, and changes are followed."""

    def read_all(self) -> StoredRegistry: ...

    def read(self, name: str) -> dict | None:
        """The name's current record, None when it is not registered."""

    def next_version(self, name: str, after: int) -> int:
        """A version number for `name` that no one has had or will get, above `after`."""

    def put(self, name: str, record: dict) -> bool:
        """Make `record` the name's current one; False when a newer version is current already (kept)."""

    def revert(self, name: str, version: int, previous: dict | None) -> None:
        """Undo put(name, record of `version`) when serving it failed: `previous` again (None: unregistered)."""

    def remove(self, name: str) -> None: ...

    def set_pinned(self, name: str, pinned: bool) -> None: ...

    def save_stats(self, stats: dict[str, tuple[int, float | None]]) -> None:
        """name -> (request count, last used): written where the store keeps them."""

    def publish(self, folder: Path, path: str) -> None:
        """A new version's folder (`root/path`) is in place: copy it where other replicas fetch it, if elsewhere."""

    def fetch(self, path: str, folder: Path) -> None:
        """`folder` (`root/path`) is missing here: fetch it from where publish() put it (else FileNotFoundError)."""

    def close(self) -> None: ...


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalJsonStore:
    """One replica's registry: `<state_dir>/registry.json`, written whole and atomically on every change."""

    shared = False

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self._records: dict[str, dict] = {}
        self._last_versions: dict[str, int] = {}

    @property
    def path(self) -> Path:
        return self.root / "registry.json"

    def read_all(self) -> StoredRegistry:
        if not self.path.exists():
            return StoredRegistry()
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            records = {name: dict(record) for name, record in data.get("adapters", {}).items()}
            last_versions = {k: int(v) for k, v in data.get("last_versions", {}).items()}
        except (ValueError, OSError, AttributeError, RecursionError, TypeError) as exc:
            raise FailedPrecondition(f"state dir: {self.path} cannot be read ({exc}); fix or move it away "
                                     "(the server never overwrites a registry it cannot read)") from None
        self._records, self._last_versions = records, last_versions
        return StoredRegistry({n: dict(r) for n, r in records.items()}, dict(last_versions))

    def read(self, name: str) -> dict | None:
        record = self._records.get(name)
        return dict(record) if record is not None else None

    def next_version(self, name: str, after: int) -> int:
        return max(self._last_versions.get(name, 0), after) + 1

    def put(self, name: str, record: dict) -> bool:
        old_record, old_last = self._records.get(name), self._last_versions.get(name)
        self._records[name] = dict(record)
        self._last_versions[name] = max(old_last or 0, int(record["version"]))
        try:
            self._write()
        except BaseException:
            self._restore(name, old_record)
            self._last_versions.pop(name) if old_last is None else self._last_versions.__setitem__(name, old_last)
            raise
        return True

    def revert(self, name: str, version: int, previous: dict | None) -> None:
        self._restore(name, previous)
        self._write()

    def remove(self, name: str) -> None:
        old = self._records.pop(name, None)
        try:
            self._write()
        except BaseException:
            self._restore(name, old)
            raise

    def set_pinned(self, name: str, pinned: bool) -> None:
        record = self._records[name]
        old = record.get("pinned")
        record["pinned"] = pinned
        try:
            self._write()
        except BaseException:
            record["pinned"] = old
            raise

    def save_stats(self, stats: dict[str, tuple[int, float | None]]) -> None:
        for name, (count, last_used) in stats.items():
            if name in self._records:
                self._records[name].update(request_count=count, last_used=last_used)
        self._write()

    def publish(self, folder: Path, path: str) -> None:
        pass

    def fetch(self, path: str, folder: Path) -> None:
        raise FileNotFoundError(f"{folder} is missing")

    def close(self) -> None:
        pass

    def _restore(self, name: str, record: dict | None) -> None:
        if record is None:
            self._records.pop(name, None)
        else:
            self._records[name] = record

    def _write(self) -> None:
        """A synced temporary file renamed over the old one."""
        data = dict(format=FORMAT, adapters=self._records, last_versions=self._last_versions)
        tmp = self.path.with_name(f".registry.json.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.root)
