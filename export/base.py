"""The base model an export starts from: an HF folder, a .gguf file or the embedded default, with its hash."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.config import ModelConfig
from loraplex.server.errors import ModelLoadError
from loraplex.server.model.arch import ModelArch, arch_from_config
from loraplex.server.model.loader import resolve_model_dir

from .outputs import file_sha256

_HASHES: dict[tuple, str] = {}
"""(file, size, mtime_ns) -> sha256: a base is hashed once per process, not once per export."""


@dataclass(frozen=True, slots=True)
class BaseModel:
    """A full-precision HF folder ready to merge into, and what identifies it."""

    path: Path
    """HF folder (config.json + *.safetensors); a GGUF is dequantized to one first (cached)."""
    arch: ModelArch
    config: dict
    """config.json as read."""
    model_id: str
    sha256: str
    """Of config.json and every *.safetensors file (names and contents)."""


def resolve_base(base: str | None, cache_dir: Path | None = None) -> BaseModel:
    """`base`: HF folder, .gguf file, or None for the embedded SmolLM2-135M-Instruct."""
    if base is not None and not Path(base).expanduser().exists():
        raise ModelLoadError(f"base {base}: no such folder or file")
    folder = resolve_model_dir(ModelConfig(path=base), cache_dir)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"base {folder}: no config.json (is it an HF model folder?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"base {config_path}: unreadable ({exc})") from None
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ModelLoadError(
            f"base {folder} is a pre-quantized checkpoint (quantization_config: {method}); merging needs "
            "full-precision weights: pass the original checkpoint (or a .gguf, which is dequantized)")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"base {folder}: no *.safetensors weights")
    return BaseModel(path=folder, arch=arch_from_config(config), config=config,
                     model_id=config.get("_name_or_path") or folder.name,
                     sha256=_folder_hash([config_path, *weights]))


def _folder_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            _HASHES[key] = file_sha256(path)
        digest.update(f"{path.name}\0{_HASHES[key]}\n".encode())
    return digest.hexdigest()
