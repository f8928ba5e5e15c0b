"""Turns a scheduled step into model inputs, runs the forward and samples: one device sync per step.

Per-step Python work is O(sequences) plus flattening the step's token ids; every per-layer
structure (attention metadata, rotary tables, LoRA metadata) is built here once and shared.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from ..lora.meta import build_lora_meta
from ..model.attention import build_attention_meta
from ..model.layers import rotary_cos_sin
from ..model.llama import CausalLM, ForwardContext
from .graphs import DecodeGraphs
from .sampler import RowSampling, build_sampling_tensors, sample
from .sequence import Sequence


@dataclass(slots=True)
class StepOutput:
    sampled: list[Sequence]
    """Sequences that produced a token this step (their prompt is fully computed)."""
    token_ids: list[int]
    logprobs: list[float] | None
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches, lora_slots, block_size: int, lora_backend: str = "active",
                 graphs: DecodeGraphs | None = None):
        self.model = model
        self.lora_slots = lora_slots
        self.graphs = graphs
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = model.device
        self.dtype = model.dtype
        self.lora_backend = lora_backend
        self.sliding_window = model.arch.sliding_window

    def run(self, batch: list[tuple[Sequence, int]], slot_targets: dict[int, frozenset[str]]) -> StepOutput:
        if self.graphs is not None and all(n == 1 for _, n in batch) and self.graphs.fits(
                len(batch), max(seq.num_computed + 1 for seq, _ in batch)):
            with record_function("graph"):
                logits = self.graphs.run(batch, [seq.lora_pairs() for seq, _ in batch])
            with record_function("sample"):
                return self._sample(logits, [seq for seq, _ in batch])
        with record_function("prepare"):
            ctx, input_ids, sampled = self._prepare(batch, slot_targets)
        with record_function("forward"):
            logits = self.model(input_ids, ctx)
        if not sampled:
            return StepOutput(sampled=[], token_ids=[], logprobs=None, top_ids=None, top_logprobs=None)
        with record_function("sample"):
            return self._sample(logits, sampled)

    def _prepare(self, batch, slot_targets):
        input_ids: list[int] = []
        query_lens, context_lens, logits_indices, sampled = [], [], [], []
        for seq, n in batch:
            start = seq.num_computed
            input_ids.extend(seq.token_ids(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            if start + n == seq.num_tokens:
                logits_indices.append(len(input_ids) - 1)
                sampled.append(seq)
        attn = build_attention_meta([seq.block_table for seq, _ in batch], context_lens, query_lens,
                                    self.block_size, self.sliding_window, self.device)
        cos, sin = rotary_cos_sin(attn.positions, self.model.inv_freq, self.dtype)
        lora = build_lora_meta([seq.lora_pairs() for seq, _ in batch], query_lens, slot_targets, self.device,
                               self.dtype)
        ctx = ForwardContext(attn=attn, cos=cos, sin=sin, kv_caches=self.kv_caches, lora=lora,
                             lora_slots=self.lora_slots, logits_indices=self._to_device(logits_indices), lora_backend=self.lora_backend)
        return ctx, self._to_device(input_ids), sampled

    def _sample(self, logits, sampled):
        rows = [self._row(seq) for seq in sampled]
        out = sample(logits, build_sampling_tensors(rows, self.device))
        want_logprobs = any(seq.request.top_logprobs > 0 for seq in sampled)
        # The one sync of the step: everything the host needs, in one transfer per tensor.
        return StepOutput(
            sampled=sampled,
            token_ids=out.token_ids.tolist(),
            logprobs=out.logprobs.tolist() if want_logprobs else None,
            top_ids=out.top_ids.tolist() if out.top_ids is not None else None,
            top_logprobs=out.top_logprobs.tolist() if out.top_logprobs is not None else None,
        )

    def _to_device(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @staticmethod
    def _row(seq: Sequence) -> RowSampling:
        params = seq.request.sampling
        penalty_ids = seq.prompt_ids + seq.output_ids if params.repetition_penalty != 1.0 else ()
        return RowSampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                           repetition_penalty=params.repetition_penalty, seed=seq.seed, step=len(seq.output_ids),
                           penalty_token_ids=penalty_ids, num_logprobs=seq.request.top_logprobs)
