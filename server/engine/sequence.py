"""A request inside the engine: its tokens, KV blocks, adapter slots and text state."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..types import GenerationRequest
from .detokenizer import IncrementalDetokenizer
from .handle import RequestHandle
from .stop import StopChecker


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
    detokenizer: IncrementalDetokenizer | None
    stop_checker: StopChecker
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose K/V are in the cache (or will be, once the step in flight has run)."""
    num_pending: int = 0
    """Tokens sampled by a step still in flight: known on the device, not yet on the host."""
    block_table: list[int] = field(default_factory=list)
    slots: list[int] | None = None
    """Device slots acquired for `needs`, in the same order (None until admitted)."""
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt + generated, counting tokens still on their way from the device."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.num_pending

    @property
    def num_uncomputed(self) -> int:
        """Tokens to feed the model next (0 once the sequence has all the tokens it may generate)."""
        if self.num_generated >= self.max_new_tokens:
            return 0
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def budget_tokens(self) -> int:
        """Most tokens this sequence can ever hold in the cache (its block reservation)."""
        return len(self.prompt_ids) + self.max_new_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Host-known token ids [start, end) (a pending token is not host-known: see num_pending)."""
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len:end - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[:end - prompt_len]

    def lora_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(zip(self.slots or (), (need.weight for need in self.needs)))
