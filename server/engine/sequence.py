"""A request inside the engine: its tokens, KV blocks, adapter slots and text state."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..types import GenerationRequest
from .handle import RequestHandle


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class AdapterNeed:
    """One adapter a sequence uses: its cache key, its weight, and how to load it if not in memory."""

    key: str
    weight: float
    loader: object
    """Callable[[], AdapterWeights] run on the loader thread."""
    depends_on: tuple[str, ...] = ()
    """Keys that must be host-ready before `loader` can run (the parts of a derived mix)."""


@dataclass(eq=False, slots=True)
class Sequence:
    seq_id: int
    request: GenerationRequest
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int
    needs: tuple[AdapterNeed, ...]
    adapter_versions: dict[str, int]
    handle: RequestHandle
    detokenizer: object | None
    stop_checker: object
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose K/V are in the cache."""
    block_table: list[int] = field(default_factory=list)
    slots: list[int] | None = None
    """Device slots acquired for `needs`, in the same order (None until admitted)."""
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def budget_tokens(self) -> int:
        """Most tokens this sequence can ever hold in the cache (its block reservation)."""
        return len(self.prompt_ids) + self.max_new_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len:end - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[:end - prompt_len]

    def lora_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(zip(self.slots or (), (need.weight for need in self.needs)))
