"""CUDA graphs for decode steps: the whole forward replayed with one launch, no per-op Python.

A decode step (every sequence contributes one token) is padded to a batch bucket, its context to a
context bucket and its number of distinct adapters to an adapter bucket, and replays the graph
captured for that triple. Inputs live in static buffers refilled each step with one host->device
copy per buffer: which slots are active is data (an index buffer), not part of the graph, so one
graph serves any adapters. When every slot is active the stacks are used in place (no gather).
Padded rows read and write only the reserved block 0 and are masked to key 0; padded adapter
entries point at slot 0 with weight 0. Padded rows' logits are dropped.

Prefill and mixed steps run eagerly: their shapes vary too much to capture.
"""
from __future__ import annotations

import logging
import time

import torch

from ..lora.meta import LoraBatchMeta
from ..model.arch import LINEAR_MODULES
from ..model.attention import AttentionMeta, build_attention_meta
from ..model.layers import rotary_cos_sin
from ..model.llama import CausalLM, ForwardContext

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
ADAPTER_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_CONTEXT_BUCKET = 256


def bucket(value: int, buckets) -> int:
    return next(b for b in buckets if b >= value)


class DecodeGraphs:
    def __init__(self, model: CausalLM, inputs, max_batch: int, max_context: int):
        kv_caches, lora_slots, block_size = inputs.kv_caches, inputs.lora_stacks, inputs.block_size
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.lora_slots = lora_slots
        num_slots = lora_slots.num_slots
        self.device, self.dtype = model.device, model.dtype
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        contexts, c = [], MIN_CONTEXT_BUCKET
        while c < max_context:
            contexts.append(c)
            c *= 2
        self.context_buckets = tuple(contexts) + (-(-max_context // block_size) * block_size,)
        self.num_slots = num_slots
        self.adapter_buckets = tuple(u for u in ADAPTER_BUCKETS if u < num_slots) + (num_slots,)
        max_b, max_c = self.batch_buckets[-1], self.context_buckets[-1]
        dev = self.device
        self.input_ids = torch.zeros(max_b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_b, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(max_b, dtype=torch.int64, device=dev)
        self.kv_gather = torch.zeros(max_b, max_c, dtype=torch.int64, device=dev)
        self.mask = torch.zeros(max_b, 1, 1, max_c, dtype=torch.bool, device=dev)
        self.token_weights = torch.zeros(max_b, num_slots, dtype=self.dtype, device=dev)
        self.active_slots = torch.zeros(num_slots, dtype=torch.int64, device=dev)
        self.arange = torch.arange(max_b, device=dev)
        self.logits = torch.zeros(max_b, model.arch.vocab_size, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def fits(self, step) -> bool:
        num_seqs = len(step.sequences)
        max_context = max(seq.num_computed + 1 for seq in step.sequences)
        return num_seqs <= self.batch_buckets[-1] and max_context <= self.context_buckets[-1]

    def _forward(self, b: int, c: int, u: int) -> None:
        """The captured computation: static buffers in, logits written into self.logits[:b]."""
        attn = AttentionMeta(
            positions=self.positions[:b], slot_mapping=self.slot_mapping[:b], kv_gather=self.kv_gather[:b, :c],
            mask=self.mask[:b, :, :, :c], token_seq=self.arange[:b], token_offset=self.arange[:b] * 0,
            num_seqs=b, max_query_len=1, decode_only=True)
        cos, sin = rotary_cos_sin(attn.positions, self.model.inv_freq, self.dtype)
        lora = None
        if u:
            active = slice(0, u) if u == self.num_slots else self.active_slots[:u]
            lora = LoraBatchMeta(active=active, num_active=u, token_weights=self.token_weights[:b, :u],
                                 target_modules=frozenset(LINEAR_MODULES), slot_ids=self.arange[:b, None] * 0 - 1,
                                 pair_weights=self.token_weights[:b, :1])
        ctx = ForwardContext(attn=attn, cos=cos, sin=sin, kv_caches=self.kv_caches, lora=lora,
                             lora_slots=self.lora_slots, logits_indices=self.arange[:b])
        self.logits[:b].copy_(self.model(self.input_ids[:b], ctx))

    def _graph(self, b: int, c: int, u: int) -> torch.cuda.CUDAGraph:
        key = (b, c, u)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        started = time.monotonic()
        self._reset_inputs(b)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels, allocator and library handles outside the capture
                self._forward(b, c, u)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(b, c, u)
        self.pool = graph.pool()
        self.graphs[key] = graph
        seconds = time.monotonic() - started
        self.capture_seconds += seconds
        log.info("captured decode graph batch %d context %d adapters %d in %.2f s", b, c, u, seconds)
        return graph

    def _reset_inputs(self, b: int) -> None:
        """Safe values for capture warm-up: every row is a padded row."""
        self.input_ids[:b].zero_()
        self.positions[:b].zero_()
        self.slot_mapping[:b].zero_()
        self.kv_gather[:b].zero_()
        self.mask[:b].zero_()
        self.mask[:b, :, :, 0] = True
        self.token_weights[:b].zero_()
        self.active_slots.zero_()

    def run(self, step) -> torch.Tensor:
        """A decode-only step. Returns logits [len(batch), vocab] (a view of a static buffer)."""
        seqs, lora_pairs = step.sequences, step.lora_pairs
        n = len(seqs)
        context_lens = [seq.num_computed + 1 for seq in seqs]
        b = bucket(n, self.batch_buckets)
        c = bucket(max(context_lens), self.context_buckets)
        active = sorted({slot for pairs in lora_pairs for slot, _ in pairs})
        u = bucket(len(active), self.adapter_buckets) if active else 0
        if u == self.num_slots:
            active = list(range(self.num_slots))  # stacks in place: columns are slots
        graph = self._graph(b, c, u)  # capture first: capturing resets the input buffers
        meta = build_attention_meta([seq.block_table for seq in seqs], context_lens, [1] * n, self.block_size,
                                    self.model.arch.sliding_window, torch.device("cpu"))
        kv_gather = torch.zeros(b, c, dtype=torch.int64)
        kv_gather[:n, :meta.kv_gather.shape[1]] = meta.kv_gather
        mask = torch.zeros(b, 1, 1, c, dtype=torch.bool)
        mask[:n, :, :, :meta.mask.shape[-1]] = meta.mask
        mask[n:, :, :, 0] = True
        pad = b - n
        positions = torch.cat([meta.positions, torch.zeros(pad, dtype=torch.int64)])
        slots = torch.cat([meta.slot_mapping, torch.zeros(pad, dtype=torch.int64)])
        self.input_ids[:n].copy_(step.input_ids)
        self.input_ids[n:b].zero_()
        self._copy(self.positions[:b], positions)
        self._copy(self.slot_mapping[:b], slots)
        self._copy(self.kv_gather[:b, :c], kv_gather)
        self._copy(self.mask[:b, :, :, :c], mask)
        if u:
            column = {slot: i for i, slot in enumerate(active)}
            weights = torch.zeros(b, u, dtype=torch.float32)
            for row, pairs in enumerate(lora_pairs):
                for slot, weight in pairs:
                    weights[row, column[slot]] += weight
            self._copy(self.token_weights[:b, :u], weights.to(self.dtype))
            self._copy(self.active_slots[:u], torch.tensor(active + [0] * (u - len(active)), dtype=torch.int64))
        graph.replay()
        return self.logits[:n]

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src.pin_memory(), non_blocking=True)
