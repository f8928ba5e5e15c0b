"""StepInputBuilder: one scheduled step -> the model's inputs, shared by the eager and graph paths.

Per step the host work is O(sequences) plus copying the step's new token ids; every per-layer
structure (attention metadata, rotary tables, LoRA metadata) is built once here and shared by all
layers. A token whose value is still on the device (sampled by the step in flight) is gathered
there from that step's output, so the next step never waits for the host to learn it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.meta import build_lora_meta
from ..model.attention import build_attention_meta
from ..model.layers import rotary_cos_sin
from ..model.llama import CausalLM, ForwardContext
from .sequence import Sequence


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor
    """[T] int64 on the device."""
    context: ForwardContext
    sampled: list[Sequence]
    """Sequences that produce a token this step (their prompt is fully computed), in logits row order."""
    sequences: list[Sequence]
    lora_pairs: list[tuple[tuple[int, float], ...]]
    decode_only: bool


class StepInputBuilder:
    def __init__(self, model: CausalLM, kv_caches, lora_stacks, block_size: int):
        self.model, self.kv_caches, self.lora_stacks = model, kv_caches, lora_stacks
        self.block_size = block_size
        self.device, self.dtype = model.device, model.dtype
        self.sliding_window = model.arch.sliding_window
        self._last_tokens: torch.Tensor | None = None
        """The in-flight step's sampled ids [N] on the device."""
        self._last_rows: dict[int, int] = {}
        """seq_id -> row of _last_tokens holding that sequence's pending token."""

    def build(self, batch: list[tuple[Sequence, int]], slot_targets: dict[int, frozenset[str]]) -> StepBatch:
        host_ids: list[int] = []
        pending_src: list[int] = []
        query_lens, context_lens, logits_indices, sampled = [], [], [], []
        for seq, n in batch:
            start = seq.num_computed
            known = min(start + n, seq.num_tokens - seq.num_pending)
            host_ids.extend(seq.token_ids(start, known))
            if known < start + n:  # the last token is the one sampled by the step in flight
                assert start + n - known == 1 and seq.seq_id in self._last_rows, "one pending token at most"
                pending_src.append(len(host_ids))
                pending_src.append(self._last_rows[seq.seq_id])
                host_ids.append(0)
            query_lens.append(n)
            context_lens.append(start + n)
            if start + n == seq.num_tokens:
                logits_indices.append(len(host_ids) - 1)
                sampled.append(seq)
        attn = build_attention_meta([seq.block_table for seq, _ in batch], context_lens, query_lens,
                                    self.block_size, self.sliding_window, self.device)
        cos, sin = rotary_cos_sin(attn.positions, self.model.inv_freq, self.dtype)
        pairs = [seq.lora_pairs() for seq, _ in batch]
        lora = build_lora_meta(pairs, query_lens, slot_targets, self.device, self.dtype)
        ctx = ForwardContext(attn=attn, cos=cos, sin=sin, kv_caches=self.kv_caches, lora=lora,
                             lora_slots=self.lora_stacks, logits_indices=self._to_device(logits_indices))
        input_ids = self._to_device(host_ids)
        if pending_src:
            where = torch.tensor(pending_src, dtype=torch.int64).view(-1, 2)
            where = where.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else where
            input_ids.index_copy_(0, where[:, 0], self._last_tokens.index_select(0, where[:, 1]))
        return StepBatch(input_ids=input_ids, context=ctx, sampled=sampled, sequences=[s for s, _ in batch],
                         lora_pairs=pairs, decode_only=all(n == 1 for _, n in batch))

    def record_sampled(self, sampled: list[Sequence], token_ids: torch.Tensor) -> None:
        """The step just launched samples `token_ids` [N] (device) for `sampled`: next steps read them here."""
        self._last_tokens = token_ids
        self._last_rows = {seq.seq_id: row for row, seq in enumerate(sampled)}

    def release(self, seq: Sequence) -> None:
        self._last_rows.pop(seq.seq_id, None)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t
