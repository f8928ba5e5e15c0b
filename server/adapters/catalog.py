"""Names -> registered adapter versions (in memory; the persistent registry builds on this).

Re-registering a name makes a new version; requests already holding the old version's key keep
using it until they finish.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

from ..errors import AdapterNotFound


@dataclass(frozen=True, slots=True)
class AdapterEntry:
    name: str
    version: int
    source: str
    sha256: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    num_bytes: int
    base_model: str = ""
    pinned: bool = False
    registered_at: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        """Cache key of this exact version."""
        return f"{self.name}@{self.version}"


class AdapterCatalog:
    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._last_version: dict[str, int] = {}

    def add(self, entry: AdapterEntry, version: int | None = None) -> AdapterEntry:
        """Insert under the next version number of its name (or `version`, restored from the persistent
        registry, which must be newer than any this name had); returns the stored entry."""
        with self._lock:
            last = self._last_version.get(entry.name, 0)
            if version is not None and version <= last:
                raise ValueError(f"adapter {entry.name!r}: version {version} is not newer than {last}")
            version = version if version is not None else last + 1
            stored = replace(entry, version=version)
            self._entries[entry.name] = stored
            self._last_version[entry.name] = version
            return stored

    def get(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered", field="adapter")
        return entry

    def remove(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered", field="name")
        return entry

    def set_pinned(self, name: str, pinned: bool) -> AdapterEntry:
        with self._lock:
            if name not in self._entries:
                raise AdapterNotFound(f"adapter {name!r} is not registered", field="name")
            self._entries[name] = replace(self._entries[name], pinned=pinned)
            return self._entries[name]

    def last_version(self, name: str) -> int:
        """Highest version this name ever had here (0 = never registered)."""
        with self._lock:
            return self._last_version.get(name, 0)

    def list(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)
