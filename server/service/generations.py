"""Running one GenerationRequest on the engine from an event loop: the part gRPC and HTTP share.

Validation and tokenizing run on the bounded worker pool (service/workers.py), never on the event
loop. The engine calls the request's listener on its own thread; the listener hands each chunk to
the caller's event loop (call_soon_threadsafe). When the caller's task is cancelled (client gone,
deadline passed) the request's handle is cancelled with it, so generation stops at the next step and
its KV blocks are freed. A request the server cuts because its shutdown grace period ended ends with
UNAVAILABLE (retryable, "the server is shutting down"), never CANCELLED, which a client could take
for its own cancel. Metrics and adapter use are recorded here once for every transport.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable

from ..engine.requests import check_sizes
from ..errors import Cancelled, LoraplexError, Unavailable
from ..types import GenerationChunk, GenerationRequest
from .metrics import OTHER_LABEL
from .routing import check_routing_header, request_names
from .runtime import Runtime

RequestFactory = Callable[[float | None], GenerationRequest]
"""Builds the request from the caller's message given its absolute deadline (time.monotonic(), or None)."""


class Generations:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def run(self, make_request: RequestFactory, remaining: float | None,
                  routing_header: str | None = None) -> AsyncIterator[GenerationChunk]:
        """The request's chunks as the engine emits them (the last one `finished`, maybe with `error`);
        `routing_header`: the x-loraplex-adapter value the caller sent (None: none), checked against the request."""
        started = time.monotonic()
        runtime = self.runtime
        engine = runtime.require_engine()
        label, code, generated, first, last = "base", "OK", 0, None, None
        handle = None
        try:
            request = make_request(started + remaining if remaining is not None else None)
            check_sizes(request, engine.limits)  # bytes only, on the loop: an oversized prompt is refused at once
            label = self._label(request, registered=False)
            check_routing_header(routing_header, request)
            names = request_names(request)
            if runtime.first_use is not None:  # an unregistered name a rule takes is registered first, once
                await runtime.first_use.ensure(names)
            loop = asyncio.get_running_loop()
            chunks: asyncio.Queue[GenerationChunk] = asyncio.Queue()

            def listener(chunk: GenerationChunk) -> None:  # engine thread
                try:
                    loop.call_soon_threadsafe(chunks.put_nowait, chunk)
                except RuntimeError:  # the event loop is gone: the server stopped
                    pass

            handle = await runtime.workers.run(engine.submit, request, listener,
                                               on_orphan=lambda orphan: orphan.cancel())
            label = self._label(request)  # the name is known now: it may take one of the capped labels
            runtime.registry.record_use(names)
            while True:
                chunk = await chunks.get()
                if chunk.token_ids:
                    last = time.monotonic()
                    first = first or last
                generated = chunk.generated_tokens
                if chunk.finished and chunk.error is not None:
                    if isinstance(chunk.error, Cancelled) and runtime.draining:
                        chunk.error = _cut_by_shutdown(chunk)
                    code = getattr(chunk.error, "code", "INTERNAL")
                yield chunk
                if chunk.finished:
                    return
        except LoraplexError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = "CANCELLED" if remaining is None or time.monotonic() - started < remaining else "DEADLINE_EXCEEDED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            if handle is not None and not handle.done:
                handle.cancel()
            if runtime.metrics is not None:
                per_token = (last - first) / (generated - 1) if first is not None and generated > 1 else None
                runtime.metrics.observe(label, code, generated, first - started if first else None, per_token)

    def _label(self, request: GenerationRequest, registered: bool = True) -> str:
        """The metrics label; a name not yet known to be registered is "other", so junk cannot use up the cap."""
        metrics = self.runtime.metrics
        if metrics is None:
            return ""
        if request.adapter and not registered:
            return OTHER_LABEL
        return metrics.label(request.adapter, mixed=bool(request.adapters))


def _cut_by_shutdown(chunk: GenerationChunk) -> Unavailable:
    return Unavailable(f"the server is shutting down: request {chunk.request_id} was stopped after "
                       f"{chunk.generated_tokens} generated tokens when its grace period ended; retry it")
