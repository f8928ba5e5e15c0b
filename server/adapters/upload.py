"""An adapter arriving in chunks: written into a staging folder, size-limited, names checked."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidArgument
from .sources import ADAPTER_FILES, remove_tree


class UploadWriter:
    """Files of one upload, each sent once in consecutive chunks, at most `max_bytes` in total.

    The folder is the registry's staging folder; `abort()` removes it. Nothing here registers.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._current: str | None = None
        self._handle = None
        self._done: set[str] = set()

    def write(self, file_name: str, data: bytes) -> None:
        if file_name != self._current:
            if file_name not in ADAPTER_FILES:
                raise InvalidArgument(f"file_name: {file_name!r} is not an adapter file (send "
                                      f"{' and '.join(ADAPTER_FILES)})", field="file_name")
            if file_name in self._done:
                raise InvalidArgument(f"file_name: {file_name!r} was already sent; send each file's chunks "
                                      "consecutively", field="file_name")
            self._close_current()
            self._current = file_name
            self._handle = open(self.folder / file_name, "wb")
        self.num_bytes += len(data)
        if self.num_bytes > self.max_bytes:
            raise InvalidArgument(f"data: the upload exceeds this server's limit of {self.max_bytes} bytes",
                                  field="data")
        self._handle.write(data)

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._done.add(self._current)
            self._handle = None

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
