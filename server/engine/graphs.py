"""CUDA graphs for decode steps: the whole forward replayed with one launch, no per-op Python.

A decode step (every sequence feeds one token) is padded to a batch bucket and replays the graph
captured for (bucket, LoRA kind): 'base' (no adapter), 'single' (one adapter per row) or 'mix'
(weighted mixes, up to max_adapters_per_request pairs). The inputs are the StepInputBuilder's static
buffers, filled the same way for the eager path, so a graph is keyed by batch bucket only: paged
attention reads the block tables where they are (no context bucket), and which adapters a step
uses is data in the LoRA metadata (no adapter bucket). Padded rows read and write only the reserved
KV block 0 and belong to no adapter; their logits are dropped.

A graph is captured lazily, on the first step of its key, from that step's own inputs: the warm-up
runs write the very K/V the step itself writes, so capturing mid-stream is harmless.
"""
from __future__ import annotations

import logging
import time

import torch

from ..buckets import BATCH_BUCKETS, batch_bucket
from ..model.layers import rotary_cos_sin
from ..model.llama import CausalLM, ForwardContext
from .step_inputs import StepBatch, StepInputBuilder

log = logging.getLogger(__name__)

class DecodeGraphs:
    def __init__(self, model: CausalLM, inputs: StepInputBuilder, max_batch: int):
        self.model, self.inputs = model, inputs
        self.device, self.dtype = model.device, model.dtype
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        max_b = self.batch_buckets[-1]
        self.logits = torch.zeros(max_b, model.arch.vocab_size, dtype=torch.float32, device=self.device)
        self.arange = torch.arange(max_b, device=self.device)
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def bucket_for(self, num_seqs: int) -> int | None:
        """The padded batch size of a decode step of `num_seqs` rows (None: too large for graphs)."""
        return batch_bucket(num_seqs, self.batch_buckets[-1]) if num_seqs <= self.batch_buckets[-1] else None

    def run(self, step: StepBatch) -> torch.Tensor:
        """A decode step built with pad_to=bucket. Returns logits [num_seqs, vocab] (a view of a static buffer)."""
        b = step.padded_to
        assert b is not None and step.decode_only
        key = (b, step.lora_kind)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key, step)
        graph.replay()
        return self.logits[:step.num_seqs]

    def _forward(self, step: StepBatch) -> None:
        """The captured computation: static buffers in, logits written into self.logits[:b]."""
        b, ctx = step.padded_to, step.context
        cos, sin = rotary_cos_sin(ctx.attn.positions, self.model.inv_freq, self.dtype)
        ctx = ForwardContext(attn=ctx.attn, cos=cos, sin=sin, kv_caches=ctx.kv_caches, lora=ctx.lora,
                             lora_stacks=ctx.lora_stacks, logits_indices=self.arange[:b])
        self.logits[:b].copy_(self.model(step.input_ids, ctx))

    def _capture(self, key: tuple[int, str], step: StepBatch) -> torch.cuda.CUDAGraph:
        started = time.monotonic()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels (Triton compiles), allocator and library handles
                self._forward(step)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(step)
        self.pool = graph.pool()
        self.graphs[key] = graph
        seconds = time.monotonic() - started
        self.capture_seconds += seconds
        log.info("captured decode graph batch %d lora %s in %.2f s", key[0], key[1], seconds)
        return graph
