"""Slot fills off the engine's critical path: pack -> pinned staging buffer -> one async copy per pool.

On a GPU a fill runs in two stages, neither of which waits for the device on the engine thread:

1. a worker thread copies the pack's bytes into a pinned staging buffer (a host memcpy, GIL released);
2. the engine thread, between steps, queues the pool copies on a side stream after an event of the compute
   stream (a step still in flight may read the slot's previous rows: `clear` set its ranks to 0 only for
   later steps), then records `done` on the side stream.

The slot is published (ranks set, readable) only after `done` has fired, by `landed`, which queries the event
and never synchronizes; the compute stream also waits on `done`, so later steps are ordered after the copy.
The device copies are queued from the engine thread only, so they never run into a CUDA-graph capture
(graphs are captured on the engine thread, between the same steps). On the CPU a fill is a plain copy and
lands at once, unless `staged` asks for the GPU's path there too (worker thread, bounded staging pool, the
pool copy queued by the engine thread between steps: tests and CPU benchmarks of admission).

An engine with nothing runnable but fills pending must not spin on `landed` (a busy engine thread starves the
staging worker of the GIL): `on_staged` wakes it when a host copy is done and `wait_copy` blocks until a
queued device copy has landed.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ..adapters.types import SlotPack
from .stacks import LoraStacks
from .staging import GRANULE, StagingPool

log = logging.getLogger(__name__)


@dataclass(eq=False)
class FillTicket:
    """One slot fill in progress."""

    slot: int
    pack: SlotPack
    buffer: torch.Tensor | None = None
    """The staging buffer lent to this fill (None on the CPU); the ticket keeps it alive until `done` fires."""
    staged: Future | None = None
    """The worker's host copy into `buffer`."""
    done: torch.cuda.Event | _Copied | None = None
    """Recorded on the side stream after the pool copies (None until they are queued)."""
    abandoned: bool = False
    """The slot was evicted before the fill landed: never publish, only give the buffer back."""


class _Copied:
    """`done` of a staged fill without CUDA: the pool copy ran on the engine thread when it was queued."""

    @staticmethod
    def query() -> bool:
        return True

    @staticmethod
    def synchronize() -> None:
        pass


class SlotFiller:
    def __init__(self, stacks: LoraStacks, staging_bytes: int, staged: bool | None = None):
        """staged: fills go through the staging pool and worker thread (None: on a GPU only)."""
        self.stacks = stacks
        self.device = stacks.device
        self.asynchronous = self.device.type == "cuda" if staged is None else staged
        cuda = self.asynchronous and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        """The side stream every pool copy runs on (never the compute stream)."""
        self.staging = StagingPool(max(staging_bytes, stacks.bytes_per_slot + GRANULE), pin=cuda)
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="slot-staging")
                          if self.asynchronous else None)
        self._outstanding: list[FillTicket] = []
        """Tickets whose staging buffer is still lent (engine thread only)."""
        self.on_staged: Callable[[], None] | None = None
        """Called (on the worker thread) when a host copy into a staging buffer is done: wakes an idle engine."""

    def has_room(self, num_bytes: int) -> bool:
        """Engine thread: whether `start` of a pack of `num_bytes` would get a staging buffer now."""
        if not self.asynchronous:
            return True
        self.poll()
        return self.staging.can_take(num_bytes)

    def start(self, slot: int, pack: SlotPack) -> FillTicket | None:
        """Begin filling `slot` (its ranks must already be 0); None while the staging pool has no room."""
        self.stacks.check_pack(slot, pack)
        if not self.asynchronous:
            self.stacks.fill(slot, pack)
            return FillTicket(slot, pack)
        self.poll()
        buffer = self.staging.take(pack.num_bytes)
        if buffer is None:
            return None
        ticket = FillTicket(slot, pack, buffer=buffer)
        ticket.staged = self._executor.submit(self._stage, buffer, pack)
        ticket.staged.add_done_callback(self._staged)
        self._outstanding.append(ticket)
        return ticket

    def _staged(self, _: Future) -> None:
        if self.on_staged is not None:
            self.on_staged()

    @staticmethod
    def _stage(buffer: torch.Tensor, pack: SlotPack) -> None:
        buffer[:pack.num_bytes].copy_(pack.buffer)

    def landed(self, ticket: FillTicket) -> bool:
        """Engine thread: True once the slot's rows are on the device (queues the copies when staged)."""
        if not self.asynchronous:
            return True
        self._advance(ticket)
        if ticket.done is None or not ticket.done.query():
            return False
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(ticket.done)  # no host wait: orders later steps
        self._give_back(ticket)
        return True

    def abandon(self, ticket: FillTicket) -> None:
        """The slot was evicted while filling: its copies may finish, but nothing publishes them."""
        ticket.abandoned = True

    def poll(self) -> None:
        """Engine thread: move every fill along and give back the buffers of finished ones."""
        for ticket in list(self._outstanding):
            self._advance(ticket)
            if ticket.abandoned and (ticket.done.query() if ticket.done is not None else ticket.staged.done()):
                self._give_back(ticket)

    @property
    def filling(self) -> int:
        return len(self._outstanding)

    def wait_copy(self) -> bool:
        """Engine thread, only with nothing in flight: block until the device copies of one queued fill have
        landed (a few ms; GIL released). False, at once, when no queued copy is still running: fills still
        staging wake the engine through `on_staged` instead."""
        for ticket in self._outstanding:
            if ticket.done is not None and not ticket.done.query():
                ticket.done.synchronize()
                return True
        return False

    def _advance(self, ticket: FillTicket) -> None:
        if ticket.done is not None or ticket.staged is None or not ticket.staged.done() or ticket.abandoned:
            return
        ticket.staged.result()  # a failed host copy is a bug: raise it on the engine thread
        if self.stream is None:  # staged on the CPU: the pool copy is a plain one, done now
            self.stacks.fill(ticket.slot, ticket.pack, ticket.buffer)
            ticket.done = _Copied()
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(compute)  # steps already queued may still read this slot's old rows
            self.stacks.fill(ticket.slot, ticket.pack, ticket.buffer)
            ticket.done = torch.cuda.Event()
            ticket.done.record(self.stream)

    def _give_back(self, ticket: FillTicket) -> None:
        if ticket in self._outstanding:
            self._outstanding.remove(ticket)
            self.staging.give_back(ticket.buffer)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
