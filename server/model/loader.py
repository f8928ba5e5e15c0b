"""Load a base model: HF folder (safetensors), a .gguf file, the embedded default, or dummy weights."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ModelLoadError
from .arch import ModelArch, load_arch
from .embedded import convert_gguf, embedded_model_dir
from .llama import CausalLM, WeightSource

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: CausalLM
    arch: ModelArch
    model_dir: Path
    model_id: str
    """Human name of the base (config `_name_or_path`, or the folder name)."""
    tokenizer: object | None
    """A transformers tokenizer, or None for a folder without tokenizer files (dummy benchmarks)."""
    quantization: str


class SafetensorsWeights(WeightSource):
    """Tensors by name from a folder's *.safetensors files (sharded or not), moved and cast on read."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype):
        from safetensors import safe_open

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in model_dir.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: pickle weights are refused; convert to safetensors)" if bins else ""
            raise ModelLoadError(f"{model_dir}: no *.safetensors weights{hint}")
        self.device, self.dtype = device, dtype
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: handle for handle in self._handles for name in handle.keys()}

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelLoadError(f"weights: tensor {name!r} is missing")
        tensor = self._where[name].get_tensor(name)
        if not torch.isfinite(tensor).all():
            raise ModelLoadError(f"weights: tensor {name!r} has NaN or infinite values")
        return tensor.to(device=self.device, dtype=self.dtype)


class DummyWeights(WeightSource):
    """Random weights in the model's shapes, made directly on the device (benchmarks: no checkpoint)."""

    def __init__(self, arch: ModelArch, device: torch.device, dtype: torch.dtype, seed: int):
        self.arch, self.device, self.dtype = arch, device, dtype
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def has(self, name: str) -> bool:
        return name != "lm_head.weight" or not self.arch.tie_word_embeddings

    def get(self, name: str) -> torch.Tensor:
        arch = self.arch
        if name.endswith("norm.weight"):
            return torch.ones(arch.hidden_size, device=self.device, dtype=self.dtype)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape = (arch.vocab_size, arch.hidden_size)
        else:
            module = name.split(".")[-2]
            n_in, n_out = arch.linear_shape(module)
            shape = (n_out,) if name.endswith(".bias") else (n_out, n_in)
        t = torch.empty(shape, device=self.device, dtype=self.dtype)
        return t.normal_(0.0, 0.02, generator=self.generator)


def resolve_model_dir(config: ModelConfig, cache_dir: Path | None = None) -> Path:
    """The HF folder to load: the embedded model's converted copy, a converted .gguf, or the folder given."""
    if config.path is None:
        return embedded_model_dir(cache_dir)
    path = Path(config.path).expanduser()
    if path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model path {path}: not a folder or .gguf file")
    return path


def load_tokenizer(model_dir: Path):
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_model(config: ModelConfig, cache_dir: Path | None = None) -> LoadedModel:
    started = time.monotonic()
    model_dir = resolve_model_dir(config, cache_dir)
    arch = load_arch(model_dir)
    device = torch.device(config.device)
    dtype = TORCH_DTYPES[config.dtype]
    if config.quantization in ("bf16", "fp16"):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[config.quantization]
    if config.load_format == "dummy":
        source: WeightSource = DummyWeights(arch, device, dtype, config.seed)
    else:
        source = SafetensorsWeights(model_dir, device, dtype)
    quantization = "nf4" if config.quantization == "nf4" else "none"
    model = CausalLM(arch, source, quantization, dtype, device)
    raw = json.loads((model_dir / "config.json").read_text())
    model_id = raw.get("_name_or_path") or model_dir.name
    tokenizer = load_tokenizer(model_dir)
    log.info("loaded %s (%s, %s, %s) in %.1f s", model_id, config.quantization, config.dtype, device,
             time.monotonic() - started)
    return LoadedModel(model=model, arch=arch, model_dir=model_dir, model_id=model_id, tokenizer=tokenizer,
                       quantization=config.quantization)
