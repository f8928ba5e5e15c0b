"""Continuous batching: which tokens of which sequences go into the next forward step.

A step has a token budget (max_num_batched_tokens), spent in this order:

1. every decoding sequence's next token (one each), so running generations never stall;
2. prompts still being prefilled, oldest first, each at most `prefill_chunk_cap` tokens
   (long_prefill_token_threshold), so one long prompt cannot take the whole step;
3. waiting sequences, FCFS, admitted while the budget and the batch size allow, their first chunk
   capped the same way: a short request arriving beside a long prompt starts at once;
4. when no sequence in the step decodes (nobody waits for a token), the budget left over goes to
   the prompts in the step, oldest first, so a prompt alone still prefills at the full budget.

Admission asks the engine (adapters ready? slots? KV blocks?): a sequence whose adapter is still
loading is passed over so it never stalls the others; one short of slots or blocks stops
admission, so the oldest request is served first when resources free up.
"""
from __future__ import annotations

import enum
from collections import deque
from typing import Callable

from ..config import SchedulerConfig
from .sequence import Sequence, SeqStatus


class Admission(enum.Enum):
    ADMITTED = "admitted"
    SKIP = "skip"
    """Not ready (adapter loading): try the next waiting sequence."""
    BLOCK = "block"
    """Short of slots or blocks: admit nothing more this step."""
    DROPPED = "dropped"
    """The sequence was finished during admission (its adapter failed to load)."""


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, try_admit: Callable[[Sequence], Admission]) -> list[tuple[Sequence, int]]:
        """[(sequence, number of its tokens to compute this step)], decodes first (see the module doc)."""
        budget = self.config.max_num_batched_tokens
        cap = self.config.prefill_chunk_cap
        batch: list[tuple[Sequence, int]] = []
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        for seq in decoding[:budget]:
            batch.append((seq, 1))
        budget -= len(batch)
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed > 1:
                n = min(seq.num_uncomputed, budget, cap)
                batch.append((seq, n))
                budget -= n
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            verdict = try_admit(seq)
            if verdict is Admission.BLOCK:
                break
            if verdict is not Admission.ADMITTED:
                continue
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget, cap)
            batch.append((seq, n))
            budget -= n
        if budget and not decoding:
            batch = self._top_up(batch, budget)
        return batch

    @staticmethod
    def _top_up(batch: list[tuple[Sequence, int]], budget: int) -> list[tuple[Sequence, int]]:
        """Give `budget` more tokens to the prompts of an all-prefill step, oldest first."""
        grown = []
        for seq, n in batch:
            extra = min(seq.num_uncomputed - n, budget)
            grown.append((seq, n + extra))
            budget -= extra
        return grown
