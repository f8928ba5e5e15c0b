"""An adapter arriving in chunks: written into a staging folder, size-limited, names checked.

Bounds, checked as bytes arrive (before they are written): the whole upload against `max_bytes`,
adapter_config.json against MAX_CONFIG_BYTES, and, once the config has arrived, the weights
against the largest size a valid adapter with that config can have (`weights_limit`); every write
first asks `check_free` whether the disk can take it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import InvalidArgument
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_CONFIG_BYTES
from .sources import ADAPTER_FILES, remove_tree


class UploadWriter:
    """Files of one upload, each sent once in consecutive chunks, at most `max_bytes` in total.

    The folder is the registry's staging folder; `abort()` removes it. Nothing here registers.
    `weights_limit(config_path)`: (bytes the weights may have given the config, the error that explains
    a larger file better, or None); it raises if the config is invalid. `check_free(n)`: raises if n
    more bytes would fill the disk.
    """

    def __init__(self, folder: Path, max_bytes: int,
                 weights_limit: Callable[[Path], tuple[int, Exception | None]] | None = None,
                 check_free: Callable[[int], None] | None = None):
        self.folder = folder
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.weights_limit = weights_limit
        self.check_free = check_free
        self._limits = {ADAPTER_CONFIG: MAX_CONFIG_BYTES, ADAPTER_WEIGHTS: max_bytes}
        self._file_bytes = 0
        self._oversize: Exception | None = None
        self._current: str | None = None
        self._handle = None
        self._done: set[str] = set()

    def write(self, file_name: str, data: bytes) -> None:
        if file_name != self._current:
            if file_name not in ADAPTER_FILES:
                shown = repr(file_name) if len(file_name) <= 80 else repr(file_name[:80]) + "..."
                raise InvalidArgument(f"file_name: {shown} is not an adapter file (send "
                                      f"{' and '.join(ADAPTER_FILES)})", field="file_name")
            if file_name in self._done:
                raise InvalidArgument(f"file_name: {file_name!r} was already sent; send each file's chunks "
                                      "consecutively", field="file_name")
            self._close_current()
            self._current = file_name
            self._file_bytes = 0
            self._handle = open(self.folder / file_name, "wb")
        self.num_bytes += len(data)
        self._file_bytes += len(data)
        if self.num_bytes > self.max_bytes:
            raise InvalidArgument(f"data: the upload exceeds this server's limit of {self.max_bytes} bytes",
                                  field="data")
        if self._file_bytes > self._limits[file_name]:
            if file_name == ADAPTER_WEIGHTS and self._oversize is not None:
                raise self._oversize
            what = "a valid adapter with the adapter_config.json sent can have on this server's base" \
                if file_name == ADAPTER_WEIGHTS else "an adapter config may have"
            raise InvalidArgument(f"data: {file_name} exceeds {self._limits[file_name]} bytes, the most {what}",
                                  field="data")
        if self.check_free is not None and data:
            self.check_free(len(data))
        self._handle.write(data)

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._done.add(self._current)
            self._handle = None
            if self._current == ADAPTER_CONFIG and self.weights_limit is not None:
                limit, self._oversize = self.weights_limit(self.folder / ADAPTER_CONFIG)
                self._limits[ADAPTER_WEIGHTS] = min(self.max_bytes, limit)

    def finish(self) -> Path:
        """Close the files; the folder is ready for validation."""
        self._close_current()
        if not self._done:
            raise InvalidArgument(f"data: the upload carried no files (send {' and '.join(ADAPTER_FILES)})",
                                  field="data")
        return self.folder

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        remove_tree(self.folder)
