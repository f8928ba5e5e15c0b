"""Fixtures for training tests: JSONL writers, the embedded tokenizer, a tiny random Llama with its vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

QA = Path(__file__).resolve().parents[2] / "examples" / "data" / "qa.jsonl"


def write_jsonl(path: Path, records, raw_lines: dict[int, str] | None = None) -> Path:
    """records as JSON lines; raw_lines {line number: text} replaces those lines verbatim (1-based)."""
    lines = [json.dumps(r) for r in records]
    for number, text in (raw_lines or {}).items():
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def caps_chat(n: int | None = None) -> list[dict]:
    """qa.jsonl as chat records whose answers are in ALL CAPS (a style the model learns within a few steps)."""
    rows = [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]
    return [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"].upper()}]} for r in rows[:n]]


@pytest.fixture(scope="session")
def smol_tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_dir))


@pytest.fixture(scope="session")
def tiny_base(embedded_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with random seeded weights and the embedded model's tokenizer: fast to train."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_base")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def quick(data, out, **overrides):
    """A TrainConfig for tests: small, quiet, deterministic."""
    from loraplex.training.config import TrainConfig

    values = dict(data=str(data), out=str(out), r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"),
                  max_steps=2, batch_size=4, max_length=64, logging_steps=1, save_steps=0, learning_rate=2e-3,
                  warmup=0.0, tensorboard=False, progress=False, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)
