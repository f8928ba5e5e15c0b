"""A bounded pool of pinned host buffers for slot fills: pinned once, reused by every fill.

Pinning is slow (page locking: ~ms per 10 MB) and pinned memory is scarce, so the host tier stays in
ordinary memory and each fill borrows one staging buffer for its asynchronous host-to-device copy, giving it
back once the copy's event has fired. The pool never holds more than `max_bytes`; a fill that finds no room
waits (its sequence is not admitted yet), it never pins outside the pool.
"""
from __future__ import annotations

import threading

import torch

GRANULE = 1 << 20
"""Buffers are sized in whole MiB so one buffer serves adapters of nearby sizes."""


class StagingPool:
    def __init__(self, max_bytes: int, pin: bool):
        self.max_bytes, self.pin = max_bytes, pin
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []
        self._held_bytes = 0
        """Bytes of every buffer the pool has allocated (free or lent)."""

    def take(self, num_bytes: int) -> torch.Tensor | None:
        """A buffer of at least `num_bytes` (uint8), or None while the pool has no room (lent buffers come back)."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= num_bytes]
            if fitting:  # (by index: == on tensors compares their elements)
                return self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
            size = -(-num_bytes // GRANULE) * GRANULE
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            while self._held_bytes + size > self.max_bytes and self._free:  # too small to serve: make room
                self._held_bytes -= self._free.pop().numel()
            if self._held_bytes + size > self.max_bytes:
                return None
            self._held_bytes += size
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def can_take(self, num_bytes: int) -> bool:
        """Whether `take(num_bytes)` would lend a buffer now (the caller being the only taker)."""
        with self._lock:
            if any(b.numel() >= num_bytes for b in self._free):
                return True
            size = -(-num_bytes // GRANULE) * GRANULE
            return self._held_bytes - sum(b.numel() for b in self._free) + size <= self.max_bytes

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return a buffer no copy reads any more."""
        with self._lock:
            self._free.append(buffer)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held_bytes
