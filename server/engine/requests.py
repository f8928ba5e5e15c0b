"""Validating and tokenizing a request at the edge: every problem names its field."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..adapters.names import MAX_ADAPTER_NAME
from ..errors import InvalidArgument
from ..types import GenerationRequest, MergeMethod

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_BYTES = 512
"""Longest stop string: the stop checker holds back up to this much text per token."""
MAX_REQUEST_ID_BYTES = 256
MAX_ADAPTER_NAME_BYTES = MAX_ADAPTER_NAME
"""The registry's bound (adapters/names.py); names are ASCII, so characters are bytes."""
NORMALIZER_SLACK = 4
"""Prompt-bytes factor for tokenizers whose normalizer may drop or merge characters."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_model_len: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_top_logprobs: int
    max_adapters_per_request: int
    vocab_size: int
    max_prompt_bytes: int | None = None
    """Most UTF-8 bytes of prompt text (all chat message contents together) that can still fit the
    context; None = no byte bound (no tokenizer). See prompt_byte_limit."""


def prompt_byte_limit(max_model_len: int, tokenizer) -> int | None:
    """Bytes of text beyond which a prompt cannot fit `max_model_len` tokens, whatever it says.

    A byte-level BPE tokenizer (no normalizer) covers every input byte by exactly one token, so a
    text of n bytes has at least n / (longest token in bytes) tokens: more bytes than
    max_model_len x that cannot fit, and are refused before any tokenizing is spent on them. A
    tokenizer with a normalizer (which may drop characters) gets NORMALIZER_SLACK times more room.
    """
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    slack = 1 if backend is not None and backend.normalizer is None else NORMALIZER_SLACK
    return max_model_len * max(_longest_token_bytes(tokenizer), 1) * slack


def _longest_token_bytes(tokenizer) -> int:
    """Bytes of the longest decoded token; only tokens whose spelling could beat the best so far are
    decoded (a decoded token has at most 4 bytes per character of its spelling)."""
    longest = 0
    for token in sorted(tokenizer.get_vocab(), key=len, reverse=True):
        if 4 * len(token) < longest:
            break
        longest = max(longest, len(tokenizer.convert_tokens_to_string([token]).encode("utf-8", "replace")))
    return longest


def max_request_bytes(limits: RequestLimits) -> int | None:
    """Largest serialized GenerateRequest / TokenizeRequest that could be valid: the prompt bytes, plus
    framing per chat message (roles are short), stop strings, request_id and adapter names. The service
    refuses bigger messages before parsing them."""
    if limits.max_prompt_bytes is None:
        return None
    return (limits.max_prompt_bytes + 32 * limits.max_model_len + MAX_STOP_SEQUENCES * (MAX_STOP_SEQUENCE_BYTES + 8)
            + MAX_REQUEST_ID_BYTES + (limits.max_adapters_per_request + 1) * (MAX_ADAPTER_NAME_BYTES + 16) + 4096)


def over_bytes(text: str, limit: int) -> bool:
    """len(text.encode()) > limit, without encoding when the length alone decides (UTF-8: 1-4 bytes a character)."""
    if len(text) * 4 <= limit:
        return False
    return len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit


def shown(value: str, limit: int = 64) -> str:
    """A client's string as quoted in an error message, cut so that a huge value is never echoed."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def check_sizes(req: GenerationRequest, limits: RequestLimits) -> None:
    """Byte bounds on every variable-size field, checked before any other work (cheap: no tokenizing).

    Called by validate_request, and by the service before it hands the request to a worker.
    """
    bound = limits.max_prompt_bytes
    if bound is not None and req.prompt is not None and over_bytes(req.prompt, bound):
        raise InvalidArgument(f"prompt: more than {bound} bytes, which cannot fit the context of "
                              f"{limits.max_model_len} tokens", field="prompt")
    if req.messages is not None:
        if len(req.messages) > limits.max_model_len:
            raise InvalidArgument(f"messages: {len(req.messages)} messages cannot fit the context of "
                                  f"{limits.max_model_len} tokens", field="messages")
        if bound is not None and sum(len(m.content) for m in req.messages) * 4 > bound and over_bytes(
                "".join(m.content for m in req.messages), bound):
            raise InvalidArgument(f"messages: their contents have more than {bound} bytes, which cannot fit the "
                                  f"context of {limits.max_model_len} tokens", field="messages")
    for i, stop in enumerate(req.stopping.stop_sequences[:MAX_STOP_SEQUENCES + 1]):
        if over_bytes(stop, MAX_STOP_SEQUENCE_BYTES):
            raise InvalidArgument(f"stopping.stop_sequences[{i}]: longer than {MAX_STOP_SEQUENCE_BYTES} bytes",
                                  field="stopping.stop_sequences")
    if over_bytes(req.request_id, MAX_REQUEST_ID_BYTES):
        raise InvalidArgument(f"request_id: longer than {MAX_REQUEST_ID_BYTES} bytes", field="request_id")
    names = [("adapter", req.adapter)] + [(f"adapters[{i}].name", a.name) for i, a in
                                          enumerate(req.adapters[:limits.max_adapters_per_request + 1])]
    for field_name, name in names:
        if over_bytes(name, MAX_ADAPTER_NAME_BYTES):
            raise InvalidArgument(f"{field_name}: {shown(name)} is longer than an adapter name can be "
                                  f"({MAX_ADAPTER_NAME_BYTES} bytes)", field=field_name)


def validate_request(req: GenerationRequest, limits: RequestLimits) -> None:
    check_sizes(req, limits)
    inputs = [name for name, value in (("prompt", req.prompt), ("messages", req.messages),
                                       ("prompt_token_ids", req.prompt_token_ids)) if value is not None]
    if len(inputs) > 1:
        raise InvalidArgument(f"input: give one of prompt / messages, got {' and '.join(inputs)}", field="input")
    if not inputs or (req.prompt is not None and req.prompt == "") or (
            req.messages is not None and not req.messages) or (
            req.prompt_token_ids is not None and not req.prompt_token_ids):
        raise InvalidArgument("prompt: the input is empty", field="prompt")
    for i, message in enumerate(req.messages or ()):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role: {shown(message.role)} is not one of {', '.join(CHAT_ROLES)}",
                                  field=f"messages[{i}].role")
    for token in req.prompt_token_ids or ():
        if not 0 <= token < limits.vocab_size:
            raise InvalidArgument(f"prompt_token_ids: {token} is outside the vocabulary [0, {limits.vocab_size})",
                                  field="prompt_token_ids")
    _validate_adapters(req, limits)
    req.sampling.validate()
    if not 0 <= req.top_logprobs <= limits.max_top_logprobs:
        raise InvalidArgument(f"top_logprobs must be in [0, {limits.max_top_logprobs}], got {req.top_logprobs}",
                              field="top_logprobs")
    stopping = req.stopping
    if not 0 <= stopping.max_new_tokens <= limits.max_new_tokens_limit:
        raise InvalidArgument(
            f"stopping.max_new_tokens must be in [1, {limits.max_new_tokens_limit}] (0 = default "
            f"{limits.default_max_new_tokens}), got {stopping.max_new_tokens}", field="stopping.max_new_tokens")
    if len(stopping.stop_sequences) > MAX_STOP_SEQUENCES or any(not s for s in stopping.stop_sequences):
        raise InvalidArgument(f"stopping.stop_sequences: at most {MAX_STOP_SEQUENCES} non-empty strings",
                              field="stopping.stop_sequences")
    if req.deadline is not None and not math.isfinite(req.deadline):
        raise InvalidArgument("deadline must be finite", field="deadline")


def _validate_adapters(req: GenerationRequest, limits: RequestLimits) -> None:
    if req.adapter and req.adapters:
        raise InvalidArgument("adapters: give either adapter or adapters (a weighted mix), not both",
                              field="adapters")
    if len(req.adapters) > limits.max_adapters_per_request:
        raise InvalidArgument(f"adapters: at most {limits.max_adapters_per_request} adapters per request, "
                              f"got {len(req.adapters)}", field="adapters")
    seen = set()
    for i, item in enumerate(req.adapters):
        if not item.name:
            raise InvalidArgument(f"adapters[{i}].name is empty", field=f"adapters[{i}].name")
        if item.name in seen:
            raise InvalidArgument(f"adapters[{i}].name: {shown(item.name)} appears twice", field=f"adapters[{i}].name")
        seen.add(item.name)
        if not math.isfinite(item.weight):
            raise InvalidArgument(f"adapters[{i}].weight must be finite, got {item.weight}",
                                  field=f"adapters[{i}].weight")
    if req.merge_method is not MergeMethod.LINEAR:
        if not req.adapters:
            raise InvalidArgument(f"merge_method {req.merge_method.name} needs a weighted list in adapters",
                                  field="merge_method")
        if not math.isfinite(req.density) or not 0 < req.density <= 1:
            raise InvalidArgument(f"density must be in (0, 1], got {req.density}", field="density")


def tokenize_request(req: GenerationRequest, tokenizer, limits: RequestLimits) -> list[int]:
    if req.prompt_token_ids is not None:
        ids = list(req.prompt_token_ids)
    elif tokenizer is None:
        raise InvalidArgument("prompt: this model has no tokenizer; send prompt_token_ids", field="prompt")
    elif req.messages is not None:
        ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.messages],
                                            add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(req.prompt).input_ids
    if len(ids) >= limits.max_model_len:
        raise InvalidArgument(f"prompt: {len(ids)} tokens leave no room to generate; the context holds "
                              f"{limits.max_model_len}", field="prompt")
    return list(ids)
