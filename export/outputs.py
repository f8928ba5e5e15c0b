"""Output folders that appear whole or not at all: staged next to the target, renamed into place when done.

A staged folder is named `.<name>.partial-<random>` beside the output, so an interrupted export never
leaves anything at the output path (and a leftover stage is recognisable and safe to delete).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from loraplex.server.hashing import file_sha256

from .errors import ExportError

INFO_FILE = "export_info.json"
"""Written last into every finished output: what was exported from what, and its validation figures."""


def check_output(out: Path, force: bool) -> None:
    """Fail early (before any heavy work) when `out` cannot be written or already exists."""
    if out.exists() and not force:
        raise ExportError(f"output {out} already exists (pass --force to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"output {out}: cannot create {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output {out}: folder {parent} is not writable")


@contextlib.contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `out`, on error it is deleted."""
    out = Path(out)
    check_output(out, force)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"output {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    publish(stage, out)


def publish(stage: Path, out: Path) -> None:
    """Rename `stage` to `out`, replacing an existing `out` (moved aside first, then deleted)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def set_aside(stage: Path, out: Path, suffix: str) -> Path:
    """Move a finished-but-rejected stage to `<out><suffix>` (e.g. `.invalid`) for inspection."""
    target = out.with_name(out.name + suffix)
    shutil.rmtree(target, ignore_errors=True)
    stage.rename(target)
    return target


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _files(folder: Path, exclude: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name not in exclude)


def tree_sha256(folder: Path, exclude: tuple[str, ...] = ()) -> str:
    """Content hash of a folder: sha256 over sorted (relative path, file sha256) lines; `exclude`: file names."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in _files(folder, exclude):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def tree_bytes(folder: Path, exclude: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in _files(folder, exclude))
