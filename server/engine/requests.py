"""Validating and tokenizing a request at the edge: every problem names its field."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..types import GenerationRequest, MergeMethod

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 16


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_model_len: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_top_logprobs: int
    max_adapters_per_request: int
    vocab_size: int


def validate_request(req: GenerationRequest, limits: RequestLimits) -> None:
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
            raise InvalidArgument(f"messages[{i}].role: {message.role!r} is not one of {', '.join(CHAT_ROLES)}",
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
            raise InvalidArgument(f"adapters[{i}].name: {item.name!r} appears twice", field=f"adapters[{i}].name")
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
