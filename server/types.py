"""Request and output types shared by the engine and the service (no protobuf here)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .errors import InvalidArgument


class MergeMethod(enum.Enum):
    LINEAR = "linear"
    """Exact: base + sum_i w_i * (alpha_i / r_i) * B_i A_i, computed per request."""
    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"


class StopReason(enum.Enum):
    NOT_FINISHED = 0
    MAX_TOKENS = 1
    EOS_TOKEN = 2
    STOP_SEQUENCE = 3
    CANCELLED = 4
    ERROR = 5


@dataclass(frozen=True, slots=True)
class AdapterWeight:
    name: str
    weight: float


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = 0
    """0 = no limit."""
    repetition_penalty: float = 1.0
    """HF semantics: seen tokens' positive logits divided by it, negative ones multiplied."""
    seed: int | None = None
    """Same seed + same request = same text; None = a random seed, reported back."""

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"sampling.temperature must be a finite number >= 0, got {self.temperature}",
                                  field="sampling.temperature")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {self.top_p}", field="sampling.top_p")
        if self.top_k < 0:
            raise InvalidArgument(f"sampling.top_k must be >= 0, got {self.top_k}", field="sampling.top_k")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(
                f"sampling.repetition_penalty must be a finite number > 0, got {self.repetition_penalty}",
                field="sampling.repetition_penalty")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"sampling.seed must fit in uint64, got {self.seed}", field="sampling.seed")


@dataclass(frozen=True, slots=True)
class StoppingCriteria:
    max_new_tokens: int = 0
    """0 = the server's default."""
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One completion request; exactly one of prompt / messages / prompt_token_ids."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    adapter: str = ""
    """A registered adapter's name; empty with no `adapters` = the base model alone."""
    adapters: tuple[AdapterWeight, ...] = ()
    """A weighted combination for this one request; exclusive with `adapter`."""
    merge_method: MergeMethod = MergeMethod.LINEAR
    density: float = 0.5
    """Share of each task vector kept by TIES / DARE."""
    merge_seed: int = 0
    """Seed of DARE's random drop."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    top_logprobs: int = 0
    request_id: str = ""
    deadline: float | None = None
    """time.monotonic() after which the request is abandoned; None = no deadline."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """The request's top_logprobs alternatives, best first, as (token_id, logprob)."""


@dataclass(slots=True)
class GenerationChunk:
    """What the engine emits for a request after a step: a delta, and on the last one the end."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    input_tokens: int = 0
    generated_tokens: int = 0
    stop_reason: StopReason = StopReason.NOT_FINISHED
    seed: int = 0
    adapter_versions: dict[str, int] = field(default_factory=dict)
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.stop_reason is not StopReason.NOT_FINISHED


@dataclass(slots=True)
class GenerationResult:
    """A whole completion, accumulated from chunks."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    input_tokens: int
    generated_tokens: int
    stop_reason: StopReason
    seed: int
    adapter_versions: dict[str, int]
    error: Exception | None = None
