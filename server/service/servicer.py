"""The Generation service: convert, run on the engine (service/generations.py, shared with the HTTP API),
stream its chunks back; Tokenize and ModelInfo.

Sizes are checked on the event loop first (bytes only, no tokenizing: an oversized prompt is refused
at once); validation, the chat template and tokenizing then run on the bounded worker pool. When the
client cancels or its deadline passes, the RPC task is cancelled and the request's handle with it;
the engine also knows the deadline, so either way generation stops at its next step and its KV
blocks are freed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata

from loraplex.v1 import generation_pb2 as gpb
from loraplex.v1 import generation_pb2_grpc

from ..engine.requests import check_sizes, over_bytes, tokenize_request
from ..errors import FailedPrecondition, InvalidArgument
from ..types import GenerationRequest
from . import convert
from .generations import Generations
from .routing import ROUTING_HEADER
from .runtime import Runtime


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.generations = Generations(runtime)

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

    def _run(self, message, context):
        """The request's chunks as the engine emits them (service/generations.py)."""
        header = next((value for key, value in context.invocation_metadata() or () if key == ROUTING_HEADER), None)
        return self.generations.run(lambda deadline: convert.request_from_proto(message, deadline),
                                    context.time_remaining(), header)

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
            max_context=engine.limits.max_model_len, max_lora_rank=lora.max_lora_rank,
            adapter_slots=engine.num_adapter_slots,
            device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
            max_new_tokens_limit=engine.limits.max_new_tokens_limit,
            max_adapters_per_request=lora.max_adapters_per_request, host_adapter_slots=lora.max_cpu_loras,
            server_version=_version())


def _tokenize(tokenizer, generation: GenerationRequest, limits, return_tokens: bool) -> gpb.TokenizeResponse:
    """Worker thread: the ids (and token strings) of a Tokenize request."""
    ids = tokenize_request(generation, tokenizer, limits)
    tokens = tokenizer.convert_ids_to_tokens(ids) if return_tokens else []
    return gpb.TokenizeResponse(token_ids=ids, tokens=tokens)


def _version() -> str:
    try:
        return importlib.metadata.version("loraplex")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
