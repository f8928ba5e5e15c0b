"""Real PEFT adapters on tiny random Llama models, saved to tmp_path, plus helpers to damage them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.server.model.arch import arch_from_config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def tiny_llama(**overrides):
    """A seeded random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads unless overridden)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def save_peft(model, folder: Path, *, dtype: torch.dtype | None = None, safe: bool = True, **lora_kwargs):
    """Wrap `model` with PEFT LoRA (random A and B), save it to `folder`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    if dtype is not None:
        peft_model.to(dtype)
    peft_model.save_pretrained(str(folder), safe_serialization=safe)
    return peft_model


@pytest.fixture(scope="session")
def tiny_arch():
    return arch_from_config(tiny_llama().config.to_dict())


@pytest.fixture
def make_adapter(tmp_path):
    """make_adapter(model_overrides=None, **lora_kwargs) -> (folder, PeftModel), saved with real PEFT."""
    counter = iter(range(1000))

    def make(model_overrides: dict | None = None, **lora_kwargs):
        folder = tmp_path / f"adapter{next(counter)}"
        return folder, save_peft(tiny_llama(**(model_overrides or {})), folder, **lora_kwargs)

    return make


@pytest.fixture
def adapter_dir(make_adapter) -> Path:
    """A plain adapter: r=4, alpha=8, q_proj and v_proj of both layers."""
    return make_adapter()[0]


def edit_config(folder: Path, **updates) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}))


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite adapter_model.safetensors with edit(dict of tensors) applied in place."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def key(layer: int, module: str, part: str) -> str:
    block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{part}.weight"
