"""StepInputBuilder: one scheduled step -> the model's inputs, shared by the eager and graph paths.

Everything lands in static, preallocated buffers (pinned staging on the host, one non_blocking copy
per buffer family): token ids, the paged-attention metadata (attention.meta) and the LoRA metadata
(lora.step_meta). A graph captured on these buffers replays correctly after the next fill, and an
eager step uses the very same views, so the two paths cannot drift apart.

Host work per step is O(sequences) Python plus vectorised numpy over the step's tokens, never
O(sequences x context): each running sequence keeps a persistent numpy block-table row to which
only newly allocated blocks are appended. A token whose value is still on the device (sampled by
the step in flight) is gathered there from that step's output buffer, so building step n+1 never
waits for step n.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..attention.meta import AttentionMetaBuffers
from ..lora.step_meta import LoraMetaBuffers, LoraStepMeta
from ..model.layers import rotary_cos_sin
from ..model.llama import CausalLM, ForwardContext
from .sequence import Sequence


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor
    """[T] int64 on the device (T padded to the graph bucket when `padded_to` is set)."""
    context: ForwardContext
    sampled: list[Sequence]
    """Sequences that produce a token this step (their prompt is fully computed), in logits row order."""
    num_seqs: int
    decode_only: bool
    lora_kind: str
    """'base' (no adapter this step), 'single' (one pair per sequence) or 'mix' (some sequence mixes)."""
    padded_to: int | None = None


class _BlockRow:
    """A sequence's block table as a growing numpy row; only new blocks are copied in."""

    __slots__ = ("array", "length")

    def __init__(self, capacity: int):
        self.array = np.zeros(capacity, dtype=np.int32)
        self.length = 0

    def sync(self, blocks: list[int]) -> np.ndarray:
        if len(blocks) > self.length:
            self.array[self.length:len(blocks)] = blocks[self.length:]
            self.length = len(blocks)
        return self.array


class StepInputBuilder:
    def __init__(self, model: CausalLM, kv_caches, lora_stacks, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, max_pairs: int):
        self.model, self.kv_caches, self.lora_stacks = model, kv_caches, lora_stacks
        self.block_size = block_size
        self.device, self.dtype = model.device, model.dtype
        self.max_seqs = max_num_seqs
        self.max_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.attn_buffers = AttentionMetaBuffers(max_num_seqs, self.max_tokens, self.max_blocks_per_seq,
                                                 self.device, block_size=block_size)
        self.lora_buffers = {
            "single": LoraMetaBuffers(self.max_tokens, max_num_seqs, 1, self.device),
            "mix": LoraMetaBuffers(self.max_tokens, max_num_seqs, max(1, max_pairs), self.device)}
        # input ids [T] | logits indices [max_seqs] | pending (position, row) pairs [2 * max_seqs]
        self._ids_at, self._logits_at, self._pending_at = 0, self.max_tokens, self.max_tokens + max_num_seqs
        size = self._pending_at + 2 * max_num_seqs
        self._device_ints = torch.zeros(size, dtype=torch.int64, device=self.device)
        on_cuda = self.device.type == "cuda"
        self._staging = ([torch.zeros(size, dtype=torch.int64, pin_memory=True) for _ in range(2)] if on_cuda
                         else [self._device_ints])
        self._events: list[torch.cuda.Event | None] = [None] * len(self._staging)
        self._turn = 0
        self._rows: dict[int, _BlockRow] = {}
        self._last_tokens: torch.Tensor | None = None
        """The newest launched step's sampled ids [N] on the device."""
        self._last_rows: dict[int, int] = {}
        """seq_id -> row of _last_tokens holding that sequence's pending token."""

    def build(self, batch: list[tuple[Sequence, int]], pad_to: int | None = None) -> StepBatch:
        """Inputs for `batch` ([(sequence, tokens to compute)]); pad_to: a decode graph's batch bucket."""
        num_seqs = len(batch)
        stage_index = self._turn
        self._turn = (self._turn + 1) % len(self._staging)
        if self._events[stage_index] is not None:
            self._events[stage_index].synchronize()  # issued two steps ago: normally long done
        stage = self._staging[stage_index].numpy()
        query_lens = np.empty(num_seqs, dtype=np.int64)
        seq_lens = np.empty(num_seqs, dtype=np.int64)
        tables, pairs, sampled, logits_at, pending = [], [], [], [], []
        t = 0
        for i, (seq, n) in enumerate(batch):
            start = seq.num_computed
            known = min(start + n, seq.num_tokens - seq.num_pending)
            ids = seq.token_ids(start, known)
            stage[t:t + len(ids)] = ids
            t += len(ids)
            if known < start + n:  # the last token is the one sampled by the step in flight
                assert start + n - known == 1, "one pending token at most"
                pending.append((t, self._last_rows[seq.seq_id]))
                stage[t] = 0
                t += 1
            query_lens[i], seq_lens[i] = n, start + n
            row = self._rows.get(seq.seq_id)
            if row is None:
                row = self._rows[seq.seq_id] = _BlockRow(self.max_blocks_per_seq)
            tables.append(row.sync(seq.block_table))
            pairs.append(seq.lora_pairs())
            if start + n == seq.num_tokens:
                logits_at.append(t - 1)
                sampled.append(seq)
        decode_only = t == num_seqs
        padded = pad_to if pad_to is not None else t
        if padded > t:
            stage[t:padded] = 0
        stage[self._logits_at:self._logits_at + len(logits_at)] = logits_at
        for k, (at, src) in enumerate(pending):
            stage[self._pending_at + 2 * k] = at
            stage[self._pending_at + 2 * k + 1] = src
        self._copy_ints(stage_index)
        input_ids = self._device_ints[:padded]
        if pending:
            where = self._device_ints[self._pending_at:self._pending_at + 2 * len(pending)].view(-1, 2)
            input_ids.index_copy_(0, where[:, 0], self._last_tokens.index_select(0, where[:, 1]))
        attn = self.attn_buffers.fill(query_lens, seq_lens, tables, num_seqs=pad_to, num_tokens=pad_to)
        lora, kind = self._lora_meta(pairs, query_lens.tolist(), pad_to)
        cos, sin = rotary_cos_sin(attn.positions, self.model.inv_freq, self.dtype)
        logits_indices = self._device_ints[self._logits_at:self._logits_at + len(logits_at)]
        ctx = ForwardContext(attn=attn, cos=cos, sin=sin, kv_caches=self.kv_caches, lora=lora,
                             lora_stacks=self.lora_stacks, logits_indices=logits_indices)
        return StepBatch(input_ids=input_ids, context=ctx, sampled=sampled, num_seqs=num_seqs,
                         decode_only=decode_only, lora_kind=kind, padded_to=pad_to)

    @staticmethod
    def lora_kind(batch: list[tuple[Sequence, int]]) -> str:
        most = max((len(seq.needs) for seq, _ in batch), default=0)
        return "base" if most == 0 else ("single" if most == 1 else "mix")

    def _lora_meta(self, pairs, tokens_per_seq, pad_to) -> tuple[LoraStepMeta | None, str]:
        most = max((len(p) for p in pairs), default=0)
        if most == 0:
            return None, "base"
        kind = "single" if most == 1 else "mix"
        meta = self.lora_buffers[kind].fill(pairs, tokens_per_seq, num_tokens_padded=pad_to,
                                            graph_safe=pad_to is not None)
        return meta, kind

    def _copy_ints(self, stage_index: int) -> None:
        if self.device.type != "cuda":
            return
        self._device_ints.copy_(self._staging[stage_index], non_blocking=True)
        event = self._events[stage_index] or torch.cuda.Event()
        event.record()
        self._events[stage_index] = event

    def record_sampled(self, sampled: list[Sequence], token_ids: torch.Tensor) -> None:
        """The step just launched samples `token_ids` [N] (device) for `sampled`: next steps read them here."""
        self._last_tokens = token_ids
        self._last_rows = {seq.seq_id: row for row, seq in enumerate(sampled)}

    def release(self, seq: Sequence) -> None:
        self._last_rows.pop(seq.seq_id, None)
        self._rows.pop(seq.seq_id, None)
