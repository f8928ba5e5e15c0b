"""Batch manifests (TOML or JSON): a base, an output folder and items, each an adapter or a mix times formats.

    base = "models/llama-3.1-8b"        # optional: HF folder or .gguf; default the embedded model
    out = "exports"                     # optional: relative to the manifest; --out overrides
    workers = 2                         # optional: parallel processes

    [defaults]                          # optional: any item field
    formats = ["hf", "onnx"]

    [[items]]
    name = "caps"                       # unique; outputs go to <out>/<name>/<format>
    adapter = "adapters/caps"

    [[items]]
    name = "caps-pirate-ties"
    adapters = [{ path = "adapters/caps", weight = 0.7 }, { path = "adapters/pirate", weight = 0.3 }]
    method = "ties"                     # linear (exact, default), ties, dare_linear, dare_ties
    density = 0.5
    seed = 7
    formats = ["hf", "onnx-int4"]

Formats: hf (merged checkpoint, `dtype`), hf-nf4 (re-quantized on purpose, error reported), onnx
(`onnx_dtype`), onnx-int4, tensorrt (an engine from the item's onnx output, or trtexec.sh where
TensorRT is missing; needs onnx). Relative paths are relative to the manifest. Structural problems
fail the whole manifest (every one listed); an adapter that is missing or does not fit fails only its item.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.adapters.names import adapter_name_problem
from loraplex.server.errors import LoraplexError
from loraplex.server.types import MergeMethod

from .errors import ExportError
from .hf import DTYPES
from .merge import AdapterSpec, MergeRecipe
from .onnx import EXPORTERS, ONNX_DTYPES
from .outputs import file_sha256
from .tensorrt import TrtProfile

FORMATS = ("hf", "hf-nf4", "onnx", "onnx-int4", "tensorrt")
ITEM_KEYS = {"name", "adapter", "adapters", "method", "density", "seed", "formats", "dtype", "onnx_dtype", "exporter",
             "validate_tokens", "block_size", "workspace_mib", "max_batch", "max_context", "base_weights",
             "allow_mixed_bases"}
TOP_KEYS = {"base", "out", "workers", "defaults", "items"}


@dataclass(frozen=True, slots=True)
class ExportItem:
    name: str
    recipe: MergeRecipe
    formats: tuple[str, ...]
    dtype: str = "bf16"
    """Of the hf / hf-nf4 checkpoints."""
    onnx_dtype: str = "fp32"
    exporter: str = "dynamo"
    validate_tokens: int = 8
    block_size: int = 32
    workspace_mib: int = 4096
    trt_profile: TrtProfile = TrtProfile()

    def to_dict(self) -> dict:
        return {"name": self.name, "recipe": self.recipe.to_dict(), "formats": list(self.formats),
                "dtype": self.dtype, "onnx_dtype": self.onnx_dtype, "exporter": self.exporter,
                "validate_tokens": self.validate_tokens, "block_size": self.block_size,
                "workspace_mib": self.workspace_mib, "max_batch": self.trt_profile.max_batch,
                "max_context": self.trt_profile.max_context}


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path
    sha256: str
    base: str | None
    out: Path
    workers: int
    items: tuple[ExportItem, ...]


def load_manifest(path: str | Path, out: str | Path | None = None, workers: int | None = None) -> Manifest:
    path = Path(path)
    raw = _read(path)
    problems: list[str] = []
    unknown = set(raw) - TOP_KEYS
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)} (allowed: {sorted(TOP_KEYS)})")
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append("defaults must be a table")
        defaults = {}
    items_raw = raw.get("items")
    if not isinstance(items_raw, list) or not items_raw:
        problems.append("items must be a non-empty list of tables ([[items]])")
        items_raw = []
    items, names = [], set()
    for index, item_raw in enumerate(items_raw):
        where = f"items[{index}]"
        if not isinstance(item_raw, dict):
            problems.append(f"{where} must be a table")
            continue
        merged = {**defaults, **item_raw}
        where = f"items[{index}] ({merged.get('name', '?')})"
        if merged.get("name") in names:
            problems.append(f"{where}: duplicate name {merged['name']!r}")
        names.add(merged.get("name"))
        try:
            items.append(_item(merged, path.parent))
        except (LoraplexError, TypeError, ValueError, KeyError) as exc:
            problems.append(f"{where}: {exc}")
    count = workers if workers is not None else raw.get("workers", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        problems.append(f"workers must be a positive integer, got {count!r}")
    if problems:
        raise ExportError(f"manifest {path}: " + "; ".join(problems))
    base = raw.get("base")
    out_dir = Path(out) if out is not None else _resolve(raw.get("out", "exports"), path.parent)
    return Manifest(path=path, sha256=file_sha256(path), base=str(_resolve(base, path.parent)) if base else None,
                    out=out_dir, workers=count, items=tuple(items))


def shard(items: tuple[ExportItem, ...], index: int, count: int) -> tuple[ExportItem, ...]:
    """Items index, index + count, ...: each Job index takes its own, disjoint slice."""
    if not 0 <= index < count:
        raise ExportError(f"shard {index}/{count}: need 0 <= index < count")
    return items[index::count]


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExportError(f"manifest {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"manifest {path}: unreadable ({exc})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ExportError(f"manifest {path}: not valid {kind} ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"manifest {path}: must hold a table/object at the top")
    return data


def _item(raw: dict, root: Path) -> ExportItem:
    unknown = set(raw) - ITEM_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (allowed: {sorted(ITEM_KEYS)})")
    name = raw.get("name")
    problem = adapter_name_problem(name)
    if problem:  # an exported adapter may be registered under this name: the server's rule
        raise ValueError(f"name: {problem}")
    if ("adapter" in raw) == ("adapters" in raw):
        raise ValueError("give exactly one of adapter (a path) or adapters (a list of {path, weight})")
    if "adapter" in raw:
        specs = (AdapterSpec(str(_resolve(raw["adapter"], root))),)
    else:
        if not isinstance(raw["adapters"], list) or not raw["adapters"]:
            raise ValueError("adapters must be a non-empty list of {path, weight, name}")
        if not all(isinstance(a, dict) and "path" in a for a in raw["adapters"]):
            raise ValueError("every entry of adapters needs a path ({ path = ..., weight = ... })")
        specs = tuple(AdapterSpec(str(_resolve(a["path"], root)), float(a.get("weight", 1.0)), str(a.get("name", "")))
                      for a in raw["adapters"])
    method = raw.get("method", "linear")
    if method not in {m.value for m in MergeMethod}:
        raise ValueError(f"method must be one of {[m.value for m in MergeMethod]}, got {method!r}")
    recipe = MergeRecipe(specs, MergeMethod(method), float(raw.get("density", 1.0)), int(raw.get("seed", 0)),
                         raw.get("base_weights", "checkpoint"), bool(raw.get("allow_mixed_bases", False)))
    formats = raw.get("formats", ["hf"])
    if not isinstance(formats, list) or not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"formats must be a non-empty list from {list(FORMATS)}, got {formats!r}")
    if "tensorrt" in formats and "onnx" not in formats:
        raise ValueError("format tensorrt builds from the item's onnx output: add onnx to formats")
    choices = (("dtype", DTYPES, "bf16"), ("onnx_dtype", ONNX_DTYPES, "fp32"), ("exporter", EXPORTERS, "dynamo"))
    for key, allowed, default in choices:
        if raw.get(key, default) not in allowed:
            raise ValueError(f"{key} must be one of {list(allowed)}, got {raw[key]!r}")
    profile = TrtProfile(max_batch=int(raw.get("max_batch", 8)), max_context=int(raw.get("max_context", 2048)),
                         opt_context=min(512, int(raw.get("max_context", 2048))),
                         max_seq=min(512, int(raw.get("max_context", 2048))))
    return ExportItem(name=name, recipe=recipe, formats=tuple(dict.fromkeys(formats)), dtype=raw.get("dtype", "bf16"),
                      onnx_dtype=raw.get("onnx_dtype", "fp32"), exporter=raw.get("exporter", "dynamo"),
                      validate_tokens=int(raw.get("validate_tokens", 8)), block_size=int(raw.get("block_size", 32)),
                      workspace_mib=int(raw.get("workspace_mib", 4096)), trt_profile=profile)


def _resolve(value, root: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path string, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path
