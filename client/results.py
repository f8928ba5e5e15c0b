"""What the typed client returns. Generations are the engine's own types (loraplex.server.types):
`generate` gives a GenerationResult, `stream` GenerationChunks (text deltas; the last has stop_reason)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tokens:
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...] = ()
    """The token strings, when asked for (`return_tokens=True`)."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    base_model: str
    quantization: str
    max_context: int
    max_lora_rank: int
    adapter_slots: int
    device: str
    dtype: str
    max_new_tokens_limit: int
    max_adapters_per_request: int
    host_adapter_slots: int
    server_version: str


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    version: int
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    sha256: str
    state: str
    """REGISTERED, LOADING, HOST or DEVICE."""
    pinned: bool
    source: str
    request_count: int
    registered_at: float | None
    """Unix time; None when unknown."""
    last_used: float | None
    warnings: tuple[str, ...] = ()
