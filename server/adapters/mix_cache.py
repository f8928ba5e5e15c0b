"""Derived adapters (TIES / DARE mixes) kept by content key: LRU in memory, optionally on disk.

A build costs seconds to minutes (see mix.py), so it happens once per key: concurrent requests for
the same mix wait for the first build, and a restart reloads the persisted result instead.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from safetensors import safe_open
from safetensors.torch import save_file

from .mix import MIX_VERSION, MixReport
from .types import AdapterWeights, ModuleLoRA

log = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Za-z0-9_:-]{1,128}")


class DerivedAdapterCache:
    """Derived adapters by mix key: LRU of `max_entries` in memory, optionally persisted to `folder`.

    `<folder>/<key>.safetensors` (written atomically, report in the metadata) lets a restart reuse a
    build. get_or_build builds a key at most once at a time: concurrent callers wait for the first.
    The folder is not trimmed."""

    def __init__(self, max_entries: int, folder: str | os.PathLike | None = None):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[AdapterWeights, MixReport]] = OrderedDict()
        self._building: dict[str, Future] = {}

    def get(self, key: str) -> tuple[AdapterWeights, MixReport] | None:
        """From memory only."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def get_or_build(self, key: str,
                     builder: Callable[[], tuple[AdapterWeights, MixReport]]) -> tuple[AdapterWeights, MixReport]:
        """Memory, else disk, else builder() (then saved); a failed build is not cached and re-raises to all."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"cache key {key!r} must match {_KEY.pattern}")
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            future = self._building.get(key)
            owner = future is None
            if owner:
                future = self._building[key] = Future()
        if not owner:
            return future.result()
        try:
            entry = self._load(key)
            if entry is None:
                entry = builder()
                self._save(key, entry)
        except BaseException as exc:
            with self._lock:
                del self._building[key]
            future.set_exception(exc)
            raise
        with self._lock:
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            del self._building[key]
        future.set_result(entry)
        return entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def _save(self, key: str, entry: tuple[AdapterWeights, MixReport]) -> None:
        if self.folder is None:
            return
        adapter, report = entry
        tensors = {}
        for (layer, module), m in adapter.modules.items():
            assert m.scale == 1.0, "derived adapters carry scale 1"
            tensors[f"{layer}.{module}.lora_a"] = m.a.contiguous()
            tensors[f"{layer}.{module}.lora_b"] = m.b.contiguous()
        metadata = {"mix_version": str(MIX_VERSION), "report": report.to_json(), "adapter": json.dumps(
            {"name": adapter.name, "source": adapter.source, "sha256": adapter.sha256, "config": adapter.config})}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self._path(key))
        except Exception as exc:  # the build is still good: serve it from memory, rebuild after a restart
            log.warning("derived adapter %s not persisted: %s", key, exc)
            Path(tmp).unlink(missing_ok=True)

    def _load(self, key: str) -> tuple[AdapterWeights, MixReport] | None:
        if self.folder is None or not self._path(key).exists():
            return None
        try:
            with safe_open(str(self._path(key)), framework="pt") as f:
                metadata = f.metadata()
                if metadata.get("mix_version") != str(MIX_VERSION):
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            info = json.loads(metadata["adapter"])
            modules = {}
            for name, a in tensors.items():
                if name.endswith(".lora_a"):
                    layer, module = name[: -len(".lora_a")].split(".", 1)
                    modules[(int(layer), module)] = ModuleLoRA(a=a, b=tensors[name[:-1] + "b"], scale=1.0)
            adapter = AdapterWeights(name=info["name"], modules=modules, source=info["source"],
                                     sha256=info["sha256"], config=info["config"])
            return adapter, MixReport.from_json(metadata["report"])
        except Exception as exc:  # a damaged file is rebuilt and overwritten, not served
            log.warning("derived adapter %s: unreadable %s (%s), rebuilding", key, self._path(key), exc)
            return None
