"""The Generation service: validate and convert, submit to the engine thread, stream its chunks back.

Sizes are checked on the event loop first (bytes only, no tokenizing: an oversized prompt is refused
at once); validation, the chat template and tokenizing then run on the bounded worker pool
(service/workers.py), never on the event loop. The engine calls a request's listener on its own
thread; the listener hands each chunk to this RPC's event loop (call_soon_threadsafe). When the
client cancels or its deadline passes, the RPC task is cancelled and the request's handle with it;
the engine also knows the deadline, so either way generation stops at its next step and its KV
blocks are freed. A request the server cuts because its shutdown grace period ended gets
UNAVAILABLE (retryable, "the server is shutting down"), never CANCELLED, which a client could take
for its own cancel.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import time

from loraplex.v1 import generation_pb2 as gpb
from loraplex.v1 import generation_pb2_grpc

from ..engine.requests import check_sizes, over_bytes, tokenize_request
from ..errors import Cancelled, FailedPrecondition, InvalidArgument, LoraplexError, Unavailable
from ..types import GenerationChunk, GenerationRequest
from . import convert
from .metrics import OTHER_LABEL
from .runtime import Runtime


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def Generate(self, request, context):
        chunks = []
        async with contextlib.aclosing(self._run(request, context)) as stream:
            async for chunk in stream:
                if chunk.error is not None:
                    raise chunk.error
                chunks.append(chunk)
        return convert.response_from_chunks(chunks)

    async def GenerateStream(self, request, context):
        async with contextlib.aclosing(self._run(request, context)) as stream:
            async for chunk in stream:
                yield convert.response_from_chunks([chunk])
                if chunk.error is not None:  # the last message says CANCELLED / ERROR, the status says why
                    raise chunk.error

    async def _run(self, message, context):
        """The request's chunks as the engine emits them; records metrics and adapter use."""
        started = time.monotonic()
        engine = self.runtime.require_engine()
        remaining = context.time_remaining()
        label, code, generated, first, last = "base", "OK", 0, None, None
        handle = None
        try:
            request = convert.request_from_proto(message, started + remaining if remaining is not None else None)
            check_sizes(request, engine.limits)
            label = self._label(request, registered=False)
            names = [request.adapter] if request.adapter else [a.name for a in request.adapters]
            if self.runtime.first_use is not None:  # an unregistered name a rule takes is registered first, once
                await self.runtime.first_use.ensure(names)
            loop = asyncio.get_running_loop()
            chunks: asyncio.Queue[GenerationChunk] = asyncio.Queue()

            def listener(chunk: GenerationChunk) -> None:  # engine thread
                try:
                    loop.call_soon_threadsafe(chunks.put_nowait, chunk)
                except RuntimeError:  # the event loop is gone: the server stopped
                    pass

            handle = await self.runtime.workers.run(engine.submit, request, listener,
                                                    on_orphan=lambda orphan: orphan.cancel())
            label = self._label(request)  # the name is known now: it may take one of the capped labels
            self.runtime.registry.record_use(names)
            while True:
                chunk = await chunks.get()
                if chunk.token_ids:
                    last = time.monotonic()
                    first = first or last
                generated = chunk.generated_tokens
                if chunk.finished and chunk.error is not None:
                    if isinstance(chunk.error, Cancelled) and self.runtime.draining:
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
            if self.runtime.metrics is not None:
                per_token = (last - first) / (generated - 1) if first is not None and generated > 1 else None
                self.runtime.metrics.observe(label, code, generated, first - started if first else None, per_token)

    def _label(self, request: GenerationRequest, registered: bool = True) -> str:
        """The metrics label; a name not yet known to be registered is "other", so junk cannot use up the cap."""
        metrics = self.runtime.metrics
        if metrics is None:
            return ""
        if request.adapter and not registered:
            return OTHER_LABEL
        return metrics.label(request.adapter, mixed=bool(request.adapters))

    async def Tokenize(self, request, context):
        engine = self.runtime.require_engine()
        if engine.tokenizer is None:
            raise FailedPrecondition("this model has no tokenizer")
        which = request.WhichOneof("input")
        if which is None or (which == "text" and not request.text):
            raise InvalidArgument("text: the input is empty", field="text")
        if which == "messages":
            generation = GenerationRequest(messages=convert.messages_from_proto(request.messages))
            if not generation.messages:
                raise InvalidArgument("messages: the input is empty", field="messages")
        else:
            bound = engine.limits.max_prompt_bytes
            if bound is not None and over_bytes(request.text, bound):
                raise InvalidArgument(f"text: more than {bound} bytes, more than any prompt this server can take "
                                      f"(its context holds {engine.limits.max_model_len} tokens)", field="text")
            generation = GenerationRequest(prompt=request.text)
        check_sizes(generation, engine.limits)  # the same byte bound as Generate, so the same cost at most
        unlimited = dataclasses.replace(engine.limits, max_model_len=1 << 62)  # tokenizing is not generating
        return await self.runtime.workers.run(_tokenize, engine.tokenizer, generation, unlimited,
                                              request.return_tokens)

    async def ModelInfo(self, request, context):
        engine = self.runtime.require_engine()
        lora = engine.config.lora
        return gpb.ModelInfoResponse(
            base_model=engine.loaded.model_id, quantization=engine.loaded.quantization,
            max_context=engine.limits.max_model_len, max_lora_rank=lora.max_lora_rank, adapter_slots=lora.max_loras,
            device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
            max_new_tokens_limit=engine.limits.max_new_tokens_limit,
            max_adapters_per_request=lora.max_adapters_per_request, host_adapter_slots=lora.max_cpu_loras,
            server_version=_version())


def _tokenize(tokenizer, generation: GenerationRequest, limits, return_tokens: bool) -> gpb.TokenizeResponse:
    """Worker thread: the ids (and token strings) of a Tokenize request."""
    ids = tokenize_request(generation, tokenizer, limits)
    tokens = tokenizer.convert_ids_to_tokens(ids) if return_tokens else []
    return gpb.TokenizeResponse(token_ids=ids, tokens=tokens)


def _cut_by_shutdown(chunk: GenerationChunk) -> Unavailable:
    return Unavailable(f"the server is shutting down: request {chunk.request_id} was stopped after "
                       f"{chunk.generated_tokens} generated tokens when its grace period ended; retry it")


def _version() -> str:
    try:
        return importlib.metadata.version("loraplex")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
