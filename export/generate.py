"""`export run-onnx`: prompt in, text out, with nothing but the export folder and onnxruntime (a smoke test)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError
from .runtime import OnnxDecoder, greedy_kv


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    token_ids: list[int]
    num_tokens: int
    seconds: float


def generate_text(folder: Path, prompt: str, max_new_tokens: int, chat: bool = True) -> Generation:
    """Greedy generation until an eos token or max_new_tokens, through the KV cache."""
    folder = Path(folder)
    if max_new_tokens < 1:
        raise ExportError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if not (folder / "model.onnx").is_file():
        raise ExportError(f"{folder}: no model.onnx (pass an `export onnx` output folder)")
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ExportError(f"{folder}: no tokenizer files; run-onnx needs the tokenizer next to model.onnx")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(prompt).input_ids
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    started = time.perf_counter()
    session = OnnxDecoder(folder / "model.onnx")
    (tokens,), _ = greedy_kv(session.step, session.empty_past, [ids], max_new_tokens, eos_ids)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(text=text, token_ids=tokens, num_tokens=len(tokens), seconds=time.perf_counter() - started)
