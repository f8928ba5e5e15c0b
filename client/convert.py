"""Keyword arguments -> request messages, and response messages -> results (the client's only protobuf code)."""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

from loraplex.server.service.routing import ROUTING_HEADER, routing_value
from loraplex.server.types import (ChatMessage, GenerationChunk, GenerationResult, StopReason, TokenLogprob)
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import generation_pb2 as gpb

from .results import AdapterInfo, ModelInfo, Tokens

Messages = Sequence[ChatMessage | Mapping[str, str]]
Mix = Mapping[str, float] | Sequence[tuple[str, float]]


def messages_proto(messages: Messages) -> gpb.ChatMessages:
    items = [m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages]
    return gpb.ChatMessages(messages=[gpb.ChatMessage(role=m.role, content=m.content) for m in items])


def generate_request(prompt: str | None = None, *, messages: Messages | None = None, adapter: str = "",
                     adapters: Mix | None = None, merge_method: str = "LINEAR", density: float | None = None,
                     merge_seed: int = 0, temperature: float = 0.0, top_p: float | None = None, top_k: int = 0,
                     repetition_penalty: float | None = None, seed: int | None = None, max_new_tokens: int = 0,
                     stop: Iterable[str] = (), ignore_eos: bool = False, top_logprobs: int = 0,
                     request_id: str = "") -> gpb.GenerateRequest:
    """One GenerateRequest; `prompt` is raw text, `messages` go through the base's chat template (give one)."""
    sampling = gpb.SamplingParameters(temperature=temperature, top_k=top_k)
    for name, value in (("top_p", top_p), ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    mix = adapters.items() if isinstance(adapters, Mapping) else adapters or ()
    request = gpb.GenerateRequest(
        adapter=adapter, adapters=[gpb.AdapterWeight(name=n, weight=w) for n, w in mix],
        merge_method=gpb.MergeMethod.Value(merge_method.upper()), merge_seed=merge_seed, sampling=sampling,
        stopping=gpb.StoppingCriteria(max_new_tokens=max_new_tokens, stop_sequences=list(stop), ignore_eos=ignore_eos),
        top_logprobs=top_logprobs, request_id=request_id)
    if density is not None:
        request.density = density
    if messages is not None:
        request.messages.CopyFrom(messages_proto(messages))
    if prompt is not None:
        request.prompt = prompt
    return request


def tokenize_request(text: str | None = None, *, messages: Messages | None = None,
                     return_tokens: bool = False) -> gpb.TokenizeRequest:
    request = gpb.TokenizeRequest(return_tokens=return_tokens)
    if messages is not None:
        request.messages.CopyFrom(messages_proto(messages))
    if text is not None:
        request.text = text
    return request


def chunk(response: gpb.GenerateResponse) -> GenerationChunk:
    return GenerationChunk(
        request_id=response.request_id, text=response.text, token_ids=list(response.token_ids),
        logprobs=[TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                  for lp in response.logprobs],
        input_tokens=response.input_tokens, generated_tokens=response.generated_tokens,
        stop_reason=StopReason(response.stop_reason), seed=response.seed,
        adapter_versions=_versions(response))


def _versions(response: gpb.GenerateResponse) -> dict[str, int]:
    """{name: version} in the request's order (`adapter_version` keeps it, the proto map does not)."""
    ordered = [item.rpartition("@") for item in response.adapter_version.split(",") if item]
    return {name: int(version) for name, _, version in ordered} or dict(response.adapter_versions)


def result(response: gpb.GenerateResponse) -> GenerationResult:
    c = chunk(response)
    return GenerationResult(request_id=c.request_id, text=c.text, token_ids=c.token_ids, logprobs=c.logprobs,
                            input_tokens=c.input_tokens, generated_tokens=c.generated_tokens,
                            stop_reason=c.stop_reason, seed=c.seed, adapter_versions=c.adapter_versions)


def tokens(response: gpb.TokenizeResponse) -> Tokens:
    return Tokens(tuple(response.token_ids), tuple(response.tokens))


def model_info(response: gpb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(**{name: getattr(response, name) for name in ModelInfo.__dataclass_fields__})


def _seconds(stamp, present: bool) -> float | None:
    return stamp.ToNanoseconds() / 1e9 if present else None


def adapter_info(info: apb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        name=info.name, version=info.version, base_model=info.base_model, rank=info.rank, alpha=info.alpha,
        target_modules=tuple(info.target_modules), size_bytes=info.size_bytes, sha256=info.sha256,
        state=apb.AdapterState.Name(info.state), pinned=info.pinned, source=info.source,
        request_count=info.request_count, registered_at=_seconds(info.registered_at, info.HasField("registered_at")),
        last_used=_seconds(info.last_used, info.HasField("last_used")), warnings=tuple(info.warnings))


def adapter(response) -> AdapterInfo:
    """The AdapterInfo of any admin response that carries one (`.adapter`)."""
    return adapter_info(response.adapter)


def adapters(response: apb.ListAdaptersResponse) -> list[AdapterInfo]:
    return [adapter_info(info) for info in response.adapters]


def upload_messages(name: str, files: Iterable[tuple[str, Iterator[bytes]]], pin: bool,
                    preload: bool) -> Iterator[apb.UploadAdapterRequest]:
    yield apb.UploadAdapterRequest(name=name, pin=pin, preload=preload)
    for file_name, chunks in files:
        for data in chunks:
            yield apb.UploadAdapterRequest(file_name=file_name, data=data)


def routing_metadata(message) -> tuple[tuple[str, str], ...]:
    """`x-loraplex-adapter` for a GenerateRequest naming adapters, so a proxy can route by adapter, and for
    LoadAdapter / UnloadAdapter (one replica's cache: the one the adapter's requests go to); else none."""
    if isinstance(message, (apb.LoadAdapterRequest, apb.UnloadAdapterRequest)):
        value = message.name
    elif isinstance(message, gpb.GenerateRequest):
        value = routing_value([message.adapter] if message.adapter else [a.name for a in message.adapters])
    else:
        return ()
    return ((ROUTING_HEADER, value),) if value and value.isascii() and value.isprintable() else ()
