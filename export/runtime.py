"""Run an exported decoder with onnxruntime: one step, and the greedy KV-cache loop (shared by run-onnx and validate).

Batches are left-padded: attention_mask marks real tokens, position_ids count real tokens only, so a
padded row computes exactly what it would alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import ExportError

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, list], tuple[np.ndarray, list]]
"""(input_ids, attention_mask, position_ids, past) -> (logits [B, S, V] fp32, present)."""


class OnnxDecoder:
    """An onnxruntime CPU session over model.onnx with the DecoderIO layout."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        if not {"input_ids", "attention_mask", "position_ids"} <= set(inputs) or not self.past_names:
            raise ExportError(f"{path}: not a loraplex decoder export (inputs: {', '.join(inputs)})")
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.kv_dtype = ORT_DTYPES.get(first.type)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def step(self, input_ids, attention_mask, position_ids, past):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self.past_names, past))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, position_ids: [B, longest] int64."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask, np.clip(mask.cumsum(1) - 1, 0, None)


def greedy_kv(step: StepFn, empty_past: Callable[[int], list], prompts: Sequence[Sequence[int]],
              max_new_tokens: int, eos_ids: Sequence[int] = (), pad_id: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """Greedy tokens per prompt through the KV cache, and the first step's logits [B, S, V].

    Rows stop at an eos id (when eos_ids is given); otherwise exactly max_new_tokens each."""
    ids, mask, positions = left_pad(prompts, pad_id)
    past = empty_past(len(prompts))
    tokens: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    first_logits = None
    for _ in range(max_new_tokens):
        logits, past = step(ids, mask, positions, past)
        if first_logits is None:
            first_logits = logits
        chosen = logits[:, -1].argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if not done[row]:
                tokens[row].append(token)
                done[row] = token in eos_ids
        if done.all():
            break
        ids = chosen[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
    return tokens, first_logits
