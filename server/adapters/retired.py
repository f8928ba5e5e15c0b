"""Retired adapter versions (replaced or deleted): their folders are removed once no queued or running request
uses them, and no sooner than RETIRED_SETTLE_SECONDS after retirement."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from .sources import remove_tree

log = logging.getLogger(__name__)

RETIRED_SETTLE_SECONDS = 1.0
"""A retired version's folder is kept at least this long: a request that looked the version up just
before it was retired may still be on its way into the engine's queue."""


class RetiredVersions:
    def __init__(self, keys_in_use: Callable[[float], set[str]]):
        self.keys_in_use = keys_in_use
        """The engine's adapter keys (name@version) of queued and running requests; TimeoutError when it is busy."""
        self._lock = threading.Lock()
        self._folders: dict[str, tuple[Path, float]] = {}
        """Cache key (name@version) -> (its folder, when it was retired)."""

    def add(self, key: str, folder: Path) -> None:
        with self._lock:
            self._folders[key] = (folder, time.monotonic())

    def __bool__(self) -> bool:
        return bool(self._folders)

    def sweep(self, live: Callable[[], set[Path]]) -> list[str]:
        """Remove the due folders no request uses (never one in `live()`: the folders records name); their keys."""
        now = time.monotonic()
        with self._lock:
            due = [key for key, (_, since) in self._folders.items() if now - since >= RETIRED_SETTLE_SECONDS]
        if not due:
            return []
        try:
            in_use = self.keys_in_use(5.0)
        except TimeoutError:  # the engine is stopping (or one step is very long): next round
            return []
        removed, kept = [], live()
        for key in due:
            with self._lock:
                if key in in_use or key not in self._folders:
                    continue
                folder, _ = self._folders.pop(key)
            if folder.resolve() in kept:  # defensive: never remove what a record still names
                continue
            remove_tree(folder)
            try:
                folder.parent.rmdir()  # the name's folder, once its last version is gone
            except OSError:
                pass
            removed.append(key)
        if removed:
            log.info("removed the files of retired adapter versions %s", ", ".join(removed))
        return removed
