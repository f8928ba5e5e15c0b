"""Continuous batching: which tokens of which sequences go into the next forward step.

Each step takes every running sequence's next token(s) first (decode: one; a prompt still being
prefilled: a chunk), then admits waiting sequences FCFS while the token budget and the batch size
allow. Admission asks the engine (adapters ready? slots? KV blocks?): a sequence whose adapter is
still loading is passed over so it never stalls the others; one short of slots or blocks stops
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
        """[(sequence, number of its tokens to compute this step)], decodes first."""
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            n = min(seq.num_uncomputed, budget)
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
            n = min(seq.num_uncomputed, budget)
            batch.append((seq, n))
            budget -= n
        return batch
