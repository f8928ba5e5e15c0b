"""The caller's side of a running request: a stream of chunks, a result, and cancel()."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

from ..errors import DeadlineExceeded
from ..types import GenerationChunk, GenerationResult, StopReason


class RequestHandle:
    """Filled by the engine thread; read from any thread (iterate, or `result()`).

    `listener`, when set, is called on the engine thread with each chunk (the gRPC layer uses it
    to hand chunks to its event loop); otherwise chunks queue up for iteration.
    """

    def __init__(self, request_id: str, listener: Callable[[GenerationChunk], None] | None = None):
        self.request_id = request_id
        self._chunks: queue.Queue[GenerationChunk] = queue.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self.listener = listener
        """Set before the request is queued (Engine.submit's `listener`) so no chunk can miss it."""

    def cancel(self) -> None:
        """Ask the engine to stop this request; it does so at its next step and frees the KV blocks."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def emit(self, chunk: GenerationChunk) -> None:
        """Engine thread only."""
        if chunk.finished:
            self._done.set()
        if self.listener is not None:
            self.listener(chunk)
        else:
            self._chunks.put(chunk)

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            chunk = self._chunks.get()
            yield chunk
            if chunk.finished:
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until finished and return the whole completion."""
        text, token_ids, logprobs = [], [], []
        last = None
        while last is None or not last.finished:
            try:
                last = self._chunks.get(timeout=timeout)
            except queue.Empty:
                raise DeadlineExceeded(f"request {self.request_id} did not finish within {timeout} s") from None
            text.append(last.text)
            token_ids.extend(last.token_ids)
            logprobs.extend(last.logprobs)
        return GenerationResult(
            request_id=self.request_id, text="".join(text), token_ids=token_ids, logprobs=logprobs,
            input_tokens=last.input_tokens, generated_tokens=last.generated_tokens, stop_reason=last.stop_reason,
            seed=last.seed, adapter_versions=last.adapter_versions, error=last.error)


def finished_ok(result: GenerationResult) -> bool:
    return result.error is None and result.stop_reason not in (StopReason.CANCELLED, StopReason.ERROR)
