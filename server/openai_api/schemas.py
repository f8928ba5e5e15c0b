"""Request bodies of the OpenAI-compatible routes, as pydantic models (FastAPI validates them).

Unknown fields are refused (400 naming the field) rather than silently ignored; OpenAI fields we do not
implement are accepted only at their neutral value (checked in requests.py). Extensions beyond OpenAI's
fields: `adapters` (an exact weighted mix), `merge_method`, `density`, `top_k`, `repetition_penalty`,
`ignore_eos`.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterWeightBody(_Body):
    name: str
    weight: float


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name`, tool fields ...: not used by the chat template

    role: str
    content: Union[str, list[TextPart], None] = None


class _Sampling(_Body):
    """Fields completions and chat completions share."""

    model: str | None = None
    """An adapter name (`name@version` names its current version), `base` or the base model's id."""
    temperature: float | None = Field(default=None, ge=0)
    """OpenAI's default is 1 (sampling); 0 = greedy, as in gRPC."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """Accepted and ignored."""
    adapters: list[AdapterWeightBody] | None = None
    """Extension: an exact weighted mix (then `model` is `base` or left out)."""
    merge_method: Literal["linear", "ties", "dare_linear", "dare_ties"] | None = None
    """Extension: how `adapters` are combined (default linear, exact)."""
    density: float | None = None
    """Extension: share of each task vector kept by TIES / DARE."""
    top_k: int | None = Field(default=None, ge=0)
    """Extension: 0 = no limit."""
    repetition_penalty: float | None = Field(default=None, gt=0)
    """Extension: HF semantics, 1 = none."""
    ignore_eos: bool = False
    """Extension: keep generating past the end-of-sequence token."""


class CompletionBody(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0)
    """How many alternatives per token (0 = the chosen token's logprob only)."""
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Newer name of max_tokens."""
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
