"""Fixtures for export tests: tiny random Llama bases with real PEFT adapters, and the embedded model's merges.

Session-scoped and shared: the expensive things (embedded merges, the embedded ONNX export) happen once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_tiny_base(folder: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**TINY)).eval().save_pretrained(str(folder))
    return folder


def save_adapter(base_dir: Path, folder: Path, seed: int, **lora) -> Path:
    """A real PEFT adapter with random A and B (init_lora_weights=False) on the base loaded from base_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora))
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{'base', 'other_base', 'a', 'b', 'c', 'foreign'}: two tiny bases of equal shapes, adapters on them.

    a: r=4 q,v; b: r=8 all projections (alpha 16); c: r=2 rsLoRA on o,down; foreign: r=4 q,v on other_base."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_base(root / "base", seed=0)
    other = save_tiny_base(root / "other-base", seed=1)
    return {
        "root": root, "base": base, "other_base": other,
        "a": save_adapter(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": save_adapter(base, root / "b", 2, r=8, lora_alpha=16, target_modules=ALL_MODULES),
        "c": save_adapter(base, root / "c", 3, r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"],
                          use_rslora=True),
        "foreign": save_adapter(other, root / "foreign", 4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    }


@pytest.fixture(scope="session")
def export_parser():
    from loraplex.export.cli import add_export_parser

    parser = argparse.ArgumentParser(prog="loraplex")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture
def cli(export_parser):
    """cli('merge', '--adapter', ...) -> exit code, as `loraplex export ...` would return it."""
    from loraplex.export.cli import run_export

    def run(*argv: str) -> int:
        return run_export(export_parser.parse_args(["export", *map(str, argv)]))

    return run


@pytest.fixture(scope="session")
def embedded_base(embedded_dir):
    from loraplex.export.base import resolve_base

    return resolve_base(str(embedded_dir))


@pytest.fixture(scope="session")
def embedded_adapter(embedded_dir, tmp_path_factory):
    """A real PEFT adapter on the embedded model: r=8 on every projection, rank 4 on o_proj (rank_pattern),
    seeded random A and B large enough to change the greedy text."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("embedded-adapter") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_MODULES, rank_pattern={"o_proj": 4},
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(7)
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            param.data = torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5
        elif "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3 / param.shape[1] ** 0.5
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def merged_fp32(embedded_base, embedded_adapter, tmp_path_factory):
    """embedded_adapter merged exactly into the embedded model, fp32 checkpoint."""
    from loraplex.export.checkpoint import CheckpointRequest, export_checkpoint
    from loraplex.export.merge import AdapterSpec, MergeRecipe

    out = tmp_path_factory.mktemp("merged") / "fp32"
    export_checkpoint(embedded_base, CheckpointRequest(MergeRecipe((AdapterSpec(str(embedded_adapter)),)), out,
                                                       "fp32"))
    return out


@pytest.fixture(scope="session")
def merged_onnx(merged_fp32, tmp_path_factory):
    """(output folder, export info) of merged_fp32 exported to ONNX fp32 and validated."""
    from loraplex.export.onnx import OnnxRequest, export_onnx

    out = tmp_path_factory.mktemp("merged-onnx") / "onnx"
    info = export_onnx(OnnxRequest(merged_fp32, out, "fp32", exporter="dynamo", validate_tokens=12))
    return out, info


def no_partials(folder: Path) -> bool:
    """No staging leftovers (".<name>.partial-*") anywhere under folder."""
    return not [p for p in Path(folder).rglob("*") if ".partial-" in p.name]
