"""Where adapters may come from: folders inside the configured adapter roots, copied into staging.

A source is resolved with every symlink followed and must stay inside a root, and so must each
file read from it; `..` components are refused outright. Registration never reads the source
again after copying: the registry owns an immutable copy per version.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import FailedPrecondition, InvalidAdapter, InvalidArgument
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
"""The files of a PEFT LoRA folder that the server keeps (README.md and the rest are not needed)."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """Adapter names become folder names and cache keys (`name@version`): keep them plain."""
    if not NAME_PATTERN.fullmatch(name or ""):
        raise InvalidArgument(f"name: {name!r} is not a valid adapter name (1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit)", field="name")
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


def copy_source(folder: Path, staging: Path, roots: list[Path], name: str) -> None:
    """Copy a source folder's adapter files into `staging`, refusing files that leave the roots."""
    from .loader import _weights_file  # torch: not for clients, which import this module for ADAPTER_FILES

    real_roots = [Path(os.path.realpath(r)) for r in roots]
    _weights_file(folder, name)  # a folder of pickle weights gets its own message here
    for file_name in ADAPTER_FILES:
        path = folder / file_name
        if not path.exists():
            continue  # validating the staged copy names what is missing
        real = Path(os.path.realpath(path))
        if not _inside(real, real_roots):
            raise InvalidArgument(f"source: {path} is a symlink to {real}, outside the adapter roots", field="source")
        if not real.is_file():
            raise InvalidAdapter(f"source: {path} is not a regular file")
        shutil.copyfile(real, staging / file_name)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
