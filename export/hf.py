"""Write a merged model as an HF checkpoint transformers loads: safetensors shards, config, tokenizer, generation config."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

from .base import BaseModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MAX_SHARD_BYTES = 5 * 1024**3
"""transformers' default max_shard_size."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    files: tuple[str, ...]
    num_tensors: int
    num_bytes: int
    """Of the weights."""
    has_tokenizer: bool


def write_checkpoint(base: BaseModel, tensors: Iterable[tuple[str, torch.Tensor]], out: Path, dtype: str,
                     extra_config: dict, max_shard_bytes: int = MAX_SHARD_BYTES) -> CheckpointInfo:
    """Cast each tensor to `dtype` and write shards of at most max_shard_bytes (one tensor per shard at least)."""
    target = DTYPES[dtype]
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = count = 0
    for name, tensor in tensors:
        tensor = tensor.to(target).contiguous()
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            shards.append(_write_shard(out, len(shards), pending))
            pending, pending_bytes = {}, 0
        pending[name] = tensor
        pending_bytes += size
        total_bytes += size
        count += 1
    if pending:
        shards.append(_write_shard(out, len(shards), pending))
    files = _name_shards(out, shards, total_bytes)
    _write_config(base, out, dtype, extra_config)
    has_tokenizer = _copy_tokenizer(base.path, out)
    _write_generation_config(base, out)
    return CheckpointInfo(files=tuple(files), num_tensors=count, num_bytes=total_bytes, has_tokenizer=has_tokenizer)


def _write_shard(out: Path, index: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    save_file(tensors, str(out / f".shard-{index}.safetensors"), metadata={"format": "pt"})
    return list(tensors)


def _name_shards(out: Path, shards: list[list[str]], total_bytes: int) -> list[str]:
    """One shard: model.safetensors. More: model-0000i-of-0000n.safetensors plus the index transformers reads."""
    if len(shards) == 1:
        (out / ".shard-0.safetensors").rename(out / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f".shard-{i}.safetensors").rename(out / name)
        names.append(name)
        weight_map.update({k: name for k in keys})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                             indent=2))
    return [*names, INDEX_FILE]


def _write_config(base: BaseModel, out: Path, dtype: str, extra: dict) -> None:
    config = {k: v for k, v in base.config.items() if k not in ("quantization_config", "loraplex_source")}
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES[dtype]
    config.update(extra)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(src: Path, out: Path) -> bool:
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied = True
    return copied


def _write_generation_config(base: BaseModel, out: Path) -> None:
    src = base.path / "generation_config.json"
    if src.is_file():
        shutil.copy2(src, out / "generation_config.json")
        return
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    config = {k: base.config[k] for k in keys if base.config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps({**config, "_from_model_config": True}, indent=2) + "\n")
