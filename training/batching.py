"""Rows and batches: one example per row (padded, optionally grouped by length), or packed rows.

Packing puts several examples in one row and restarts position_ids at 0 for each. With no
attention_mask, transformers reads a restart as a sequence boundary and builds a block-diagonal causal
mask (sdpa / eager; flash-attention uses the same positions as varlen boundaries), so no token attends
to another example; tests/training/test_batching.py checks logits against each example run alone.
labels[0] of every example is -100, so no example is trained to predict from the one before it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .attention import boundaries
from .encode import IGNORE, Encoded


@dataclass(frozen=True, slots=True)
class PackStats:
    rows: int
    examples: int
    tokens: int
    row_length: int

    @property
    def fill(self) -> float:
        """Real tokens / (rows * row_length)."""
        return self.tokens / max(1, self.rows * self.row_length)


def pack(encoded: list[Encoded], row_length: int) -> tuple[list[dict], PackStats]:
    """Best-fit decreasing into rows of at most row_length tokens (deterministic: ties keep input order)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for i in order:
        size = len(encoded[i].input_ids)
        assert size <= row_length, "examples are truncated to max_length before packing"
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
        else:
            space, row = row_length, len(rows)
            rows.append([i])
        if space - size > 0:
            bisect.insort(free, (space - size, row))
    packed = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            ids += encoded[i].input_ids
            labels += encoded[i].labels
            positions += range(len(encoded[i].input_ids))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    tokens = sum(len(e.input_ids) for e in encoded)
    return packed, PackStats(rows=len(rows), examples=len(encoded), tokens=tokens, row_length=row_length)


def unpacked(encoded: list[Encoded]) -> list[dict]:
    return [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in encoded]


class Collator:
    """Rows -> tensors padded to the longest row of the batch (pad_to_multiple_of: round the width up).

    Unpacked rows get an attention_mask. Packed rows get position_ids and no attention_mask; their
    padding continues with positions 0, 1, ... (one more segment, never trained). `num_tokens` (real,
    non-padding tokens) is popped by LoraplexTrainer for tokens/s; `logits_to_keep=1` makes the model
    skip the full [batch, seq, vocab] logits when the loss is computed in chunks from hidden states.
    `varlen` (packed rows for the loraplex_varlen attention): also the example boundaries over the flattened
    batch, `cu_seq_lens_q/k` and `max_length_q/k` (training/attention.py), computed here on the CPU once."""

    def __init__(self, pad_token_id: int, chunked_loss: bool = False, pad_to_multiple_of: int = 1,
                 varlen: bool = False):
        self.pad_token_id, self.chunked_loss = pad_token_id, chunked_loss
        self.pad_to_multiple_of, self.varlen = pad_to_multiple_of, varlen

    def __call__(self, rows: list[dict]) -> dict:
        lengths = [len(r["input_ids"]) for r in rows]
        width = -(-max(lengths) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for b, (row, n) in enumerate(zip(rows, lengths)):
            ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
        batch = {"input_ids": ids, "labels": labels, "num_tokens": torch.tensor(sum(lengths))}
        if "position_ids" in rows[0]:  # packed rows (eval rows are never packed)
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            for b, (row, n) in enumerate(zip(rows, lengths)):
                positions[b, :n] = torch.tensor(row["position_ids"])
                positions[b, n:] = torch.arange(width - n)
            batch["position_ids"] = positions
            cu_seq_lens, longest = boundaries(positions) if self.varlen else (None, 0)
            if cu_seq_lens is not None and len(cu_seq_lens) - 1 > len(rows):  # else: one example per row, no padding
                batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
                batch["max_length_q"] = batch["max_length_k"] = longest
        else:
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, n in enumerate(lengths):
                mask[b, :n] = 1
            batch["attention_mask"] = mask
        if self.chunked_loss:
            batch["logits_to_keep"] = 1
        return batch


class RowDataset(torch.utils.data.Dataset):
    """A list of row dicts; Trainer's length grouping reads len(row['input_ids'])."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]
