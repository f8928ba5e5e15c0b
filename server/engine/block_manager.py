"""Paged KV block allocation with admission-time reservation.

A sequence is admitted only if the blocks for its whole budget (prompt + max_new_tokens) are
free, so a running sequence never has to be preempted for memory; blocks are handed out lazily
as it grows and all return to the pool on finish, cancel or error. Block 0 is never handed out
(it is the padding target of paged attention).
"""
from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._promised = 0
        """Blocks reserved by admitted sequences but not yet handed out."""
        self._reservations: dict[int, int] = {}
        """seq_id -> blocks still promised to it."""

    @property
    def capacity(self) -> int:
        """Blocks a single sequence could ever get."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_available_blocks(self) -> int:
        """Free blocks not promised to an admitted sequence: what admission may take."""
        return len(self._free) - self._promised

    @property
    def usage(self) -> float:
        """Share of blocks in use or promised (the KV-usage metric)."""
        return 1.0 - self.num_available_blocks / self.capacity

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_available_blocks

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        blocks = self.blocks_for(num_tokens)
        if blocks > self.num_available_blocks:
            raise RuntimeError(f"reserve({seq_id}): {blocks} blocks wanted, {self.num_available_blocks} available")
        self._reservations[seq_id] = blocks
        self._promised += blocks

    def grow(self, seq_id: int, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to `block_table` until it holds `num_tokens` tokens (from the reservation)."""
        while len(block_table) * self.block_size < num_tokens:
            if self._reservations.get(seq_id, 0) <= 0:
                raise RuntimeError(f"sequence {seq_id} grew past its reservation")
            self._reservations[seq_id] -= 1
            self._promised -= 1
            block_table.append(self._free.popleft())

    def free(self, seq_id: int, block_table: list[int]) -> None:
        """Return a sequence's blocks and the rest of its reservation; idempotent."""
        self._free.extend(block_table)
        block_table.clear()
        self._promised -= self._reservations.pop(seq_id, 0)
