"""Where adapters may come from: folders inside the configured adapter roots, copied into staging.

A source is resolved with every symlink followed and must stay inside a root, and so must each
file read from it; `..` components are refused outright. Before a byte is copied, each file's size
is checked against the most a valid adapter can need (the caller's limit) and the disk against the
total; the copy goes in chunks, stops as soon as `should_stop()` says the client went away, and
refuses a file that grows or changes meanwhile. Registration never reads the source again after
copying: the registry owns an immutable copy per version.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import Cancelled, FailedPrecondition, InvalidAdapter, InvalidArgument
from .names import adapter_name_problem
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_CONFIG_BYTES

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
"""The files of a PEFT LoRA folder that the server keeps (README.md and the rest are not needed)."""
COPY_CHUNK_BYTES = 1 << 20


def check_name(name: str) -> str:
    """The registry's edge: names.py holds the rule (the same one `train --register` checks)."""
    problem = adapter_name_problem(name)
    if problem:
        raise InvalidArgument(f"name: {problem}", field="name")
    return name


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def resolve_source(source: str, roots: list[Path]) -> Path:
    """The real folder `source` names, inside one of `roots` (absolute, or relative to a root)."""
    if not roots:
        raise FailedPrecondition("source: this server has no adapter roots (start it with --adapter-root DIR), "
                                 "so it registers adapters only by upload", field="source")
    if not source:
        raise InvalidArgument("source: empty; give a PEFT adapter folder inside the adapter roots", field="source")
    if len(source) > 4096 or "\0" in source:
        raise InvalidArgument("source: not a usable path (over 4096 characters, or a NUL byte)", field="source")
    if ".." in Path(source).parts:
        raise InvalidArgument(f"source: {source!r} contains '..', which is refused", field="source")
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    given = Path(source)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if not _inside(real, real_roots):
            reason = "resolves (through a symlink) to a place" if _inside(candidate, real_roots) else "is"
            raise InvalidArgument(f"source: {source!r} {reason} outside the adapter roots "
                                  f"({', '.join(map(str, roots))})", field="source")
        if real.is_dir():
            return real
    raise InvalidArgument(f"source: {source!r} is not a folder inside the adapter roots "
                          f"({', '.join(map(str, roots))})", field="source")


class TooLarge(InvalidAdapter):
    """A source file larger than any valid adapter with its config can be (nothing was copied)."""


def stop_if(should_stop: Callable[[], bool] | None) -> None:
    """Raise Cancelled when the caller has gone away (its RPC was cancelled or passed its deadline)."""
    if should_stop is not None and should_stop():
        raise Cancelled("the registration was stopped: the client went away or its deadline passed")


def source_files(folder: Path, roots: list[Path], name: str, weights_limit: int) -> dict[str, Path]:
    """The adapter files of a source folder (file name -> real path), each inside the roots, a regular
    file, and no larger than a valid adapter can be; nothing is read yet."""
    from .loader import _weights_file  # torch: not for clients, which import this module for ADAPTER_FILES

    real_roots = [Path(os.path.realpath(r)) for r in roots]
    _weights_file(folder, name, str(folder))  # a folder of pickle weights gets its own message here
    files = {}
    for file_name, limit in ((ADAPTER_CONFIG, MAX_CONFIG_BYTES), (ADAPTER_WEIGHTS, weights_limit)):
        path = folder / file_name
        if not path.exists():
            continue  # validating the staged copy names what is missing
        real = Path(os.path.realpath(path))
        if not _inside(real, real_roots):
            raise InvalidArgument(f"source: {path} is a symlink to {real}, outside the adapter roots", field="source")
        if not real.is_file():
            raise InvalidAdapter(f"source: {path} is not a regular file")
        size = real.stat().st_size
        if size > limit:
            raise TooLarge(f"adapter {name!r}: {path} has {size} bytes, more than a valid adapter with this "
                                 f"adapter_config.json can have on this server's base ({limit} bytes at most); "
                                 "nothing was copied")
        files[file_name] = real
    return files


def copy_source(files: dict[str, Path], staging: Path, limits: dict[str, int],
                should_stop: Callable[[], bool] | None = None) -> None:
    """Copy source files into `staging` in chunks: stops (Cancelled) when `should_stop()` turns true,
    refuses a file that grows past its limit or changes while it is copied."""
    for file_name, real in files.items():
        before = _stamp(real)
        copied = write_chunks(file_chunks(real), staging / file_name, limits[file_name], str(real), should_stop)
        if _stamp(real) != before or copied != before[1]:
            raise InvalidAdapter(f"source: {real} changed while it was being copied; retry")


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as src:
        while chunk := src.read(COPY_CHUNK_BYTES):
            yield chunk


def write_chunks(chunks: Iterable[bytes], dst: Path, limit: int, shown: str,
                 should_stop: Callable[[], bool] | None = None) -> int:
    """Write `chunks` to `dst` (synced) and return the byte count; checks `should_stop()` before each chunk
    (Cancelled) and refuses more than `limit` bytes, whatever the source announced beforehand."""
    copied = 0
    with open(dst, "wb") as out:
        for chunk in chunks:
            stop_if(should_stop)
            copied += len(chunk)
            if copied > limit:
                raise InvalidAdapter(f"source: {shown} grew past {limit} bytes while it was copied")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return copied


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
