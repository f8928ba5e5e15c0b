"""The only bridge between protobuf messages and loraplex's own types (types.py never imports protobuf).

Proto3 has no null: fields whose zero is a valid, different value (top_p, repetition_penalty, seed,
density) are `optional` in the .proto, and unset means the documented default here.
"""
from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import generation_pb2 as gpb

from ..adapters.catalog import AdapterEntry
from ..adapters.registry import AdapterStatus
from ..errors import InvalidArgument
from ..types import (AdapterWeight, ChatMessage, GenerationChunk, GenerationRequest, MergeMethod, SamplingParams,
                     StoppingCriteria)

_MERGE_METHODS = {gpb.LINEAR: MergeMethod.LINEAR, gpb.TIES: MergeMethod.TIES,
                  gpb.DARE_LINEAR: MergeMethod.DARE_LINEAR, gpb.DARE_TIES: MergeMethod.DARE_TIES}


def merge_method_from_proto(value: int) -> MergeMethod:
    """Proto3 enums are open: a number no MergeMethod has arrives as that number, and is refused."""
    method = _MERGE_METHODS.get(value)
    if method is None:
        names = ", ".join(f"{gpb.MergeMethod.Name(v)} ({v})" for v in sorted(_MERGE_METHODS))
        raise InvalidArgument(f"merge_method: {value} is not a known value (one of {names})", field="merge_method")
    return method


def _optional(message, name: str, default):
    return getattr(message, name) if message.HasField(name) else default


def messages_from_proto(chat: gpb.ChatMessages) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role=m.role, content=m.content) for m in chat.messages)


def request_from_proto(msg: gpb.GenerateRequest, deadline: float | None = None) -> GenerationRequest:
    """Field for field; values are checked by the engine's validate_request (errors name the field)."""
    which = msg.WhichOneof("input")
    sampling = msg.sampling
    return GenerationRequest(
        prompt=msg.prompt if which == "prompt" else None,
        messages=messages_from_proto(msg.messages) if which == "messages" else None,
        adapter=msg.adapter,
        adapters=tuple(AdapterWeight(name=a.name, weight=a.weight) for a in msg.adapters),
        merge_method=merge_method_from_proto(msg.merge_method),
        density=_optional(msg, "density", 0.5),
        merge_seed=msg.merge_seed,
        sampling=SamplingParams(
            temperature=_optional(sampling, "temperature", 0.0), top_p=_optional(sampling, "top_p", 1.0),
            top_k=sampling.top_k, repetition_penalty=_optional(sampling, "repetition_penalty", 1.0),
            seed=_optional(sampling, "seed", None)),
        stopping=StoppingCriteria(max_new_tokens=msg.stopping.max_new_tokens,
                                  stop_sequences=tuple(msg.stopping.stop_sequences),
                                  ignore_eos=msg.stopping.ignore_eos),
        top_logprobs=msg.top_logprobs,
        request_id=msg.request_id,
        deadline=deadline)


def adapter_version(versions: dict[str, int]) -> str:
    return ",".join(f"{name}@{version}" for name, version in versions.items())


def response_from_chunks(chunks: list[GenerationChunk]) -> gpb.GenerateResponse:
    """One GenerateResponse for a chunk (streaming) or for a whole completion (its chunks in order)."""
    last = chunks[-1]
    response = gpb.GenerateResponse(
        text="".join(c.text for c in chunks), token_ids=[t for c in chunks for t in c.token_ids],
        input_tokens=last.input_tokens, generated_tokens=last.generated_tokens,
        stop_reason=last.stop_reason.value, seed=last.seed, adapter_version=adapter_version(last.adapter_versions),
        request_id=last.request_id, adapter_versions=last.adapter_versions)
    for chunk in chunks:
        for lp in chunk.logprobs:
            response.logprobs.append(gpb.TokenLogprob(
                token_id=lp.token_id, logprob=lp.logprob,
                top=[gpb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top]))
    return response


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def adapter_info(status: AdapterStatus) -> apb.AdapterInfo:
    info = entry_info(status.entry, status.state)
    info.source = status.source
    info.request_count = status.request_count
    info.warnings.extend(status.warnings)
    if status.last_used is not None:
        info.last_used.CopyFrom(_timestamp(status.last_used))
    return info


def entry_info(entry: AdapterEntry, state: str = "REGISTERED") -> apb.AdapterInfo:
    return apb.AdapterInfo(
        name=entry.name, version=entry.version, base_model=entry.base_model, rank=entry.rank, alpha=entry.alpha,
        target_modules=list(entry.target_modules), size_bytes=entry.num_bytes, sha256=entry.sha256,
        state=apb.AdapterState.Value(state), pinned=entry.pinned, source=entry.source,
        registered_at=_timestamp(entry.registered_at))
