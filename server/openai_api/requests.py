"""OpenAI request bodies -> loraplex GenerationRequests; the model name -> an adapter (or the base).

`model` is an adapter name, `name@version` (served only while it is that name's current version: a
request runs on the current version), `base`, or the base model's id. An exact weighted mix goes in
the extension field `adapters`, with `model` `base` or left out. OpenAI fields we do not implement are
accepted only at their neutral value; anything else is a 400 naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..adapters.catalog import AdapterCatalog
from ..errors import AdapterNotFound, InvalidArgument
from ..types import (AdapterWeight, ChatMessage, GenerationRequest, MergeMethod, SamplingParams,
                     StoppingCriteria)
from .schemas import ChatCompletionBody, CompletionBody

BASE_MODEL = "base"
OPENAI_DEFAULT_TEMPERATURE = 1.0
_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "echo": False, "suffix": "",
            "best_of": 1}
"""OpenAI fields we do not implement -> the one value (besides null) we accept."""


@dataclass(frozen=True, slots=True)
class ModelNames:
    """What the routes need to know about the served models."""

    base_id: str
    catalog: AdapterCatalog

    def check_mix(self, mix: tuple[AdapterWeight, ...]) -> None:
        """Every adapter of a weighted mix is registered (404 naming the item otherwise)."""
        for i, item in enumerate(mix):
            try:
                self.catalog.get(item.name)
            except AdapterNotFound:
                raise AdapterNotFound(f"adapters[{i}].name: {item.name!r} is not a registered adapter "
                                      "(GET /v1/models lists them)", field=f"adapters[{i}].name") from None

    def adapter_for(self, model: str | None, mixed: bool) -> str:
        """The adapter a request's `model` names ("" = the base model alone)."""
        if model is None or model == "":
            if mixed:
                return ""
            raise InvalidArgument("model: missing; name an adapter (GET /v1/models lists them) or 'base'",
                                  field="model")
        if model in (BASE_MODEL, self.base_id):
            return ""
        if mixed:
            raise InvalidArgument(f"adapters: a weighted mix goes with model '{BASE_MODEL}' (or no model), "
                                  f"not with {model!r}", field="adapters")
        name, at, version = model.partition("@")
        try:
            entry = self.catalog.get(name)
        except AdapterNotFound:
            raise AdapterNotFound(f"model: {model!r} is neither a registered adapter nor '{BASE_MODEL}' "
                                  "(GET /v1/models lists them)", field="model") from None
        if at and version != str(entry.version):
            raise AdapterNotFound(f"model: {model!r} is not served: the current version of {name!r} is "
                                  f"{entry.version}", field="model")
        return name


def completion_request(body: CompletionBody, names: ModelNames, deadline: float | None) -> GenerationRequest:
    _check_neutral(body)
    prompt, token_ids = _prompt(body.prompt)
    return _request(body, names, deadline, prompt=prompt, prompt_token_ids=token_ids,
                    max_tokens=body.max_tokens, top_logprobs=body.logprobs)


def chat_request(body: ChatCompletionBody, names: ModelNames, deadline: float | None) -> GenerationRequest:
    _check_neutral(body)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise InvalidArgument("max_completion_tokens: give it or max_tokens, not both", field="max_completion_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidArgument("top_logprobs: needs logprobs: true", field="top_logprobs")
    messages = tuple(ChatMessage(role=m.role, content=_content(m.content, i)) for i, m in enumerate(body.messages))
    if not messages:
        raise InvalidArgument("messages: the list is empty", field="messages")
    return _request(body, names, deadline, messages=messages, max_tokens=body.max_completion_tokens or body.max_tokens,
                    top_logprobs=(body.top_logprobs or 0) if body.logprobs else None)


def _request(body, names: ModelNames, deadline: float | None, max_tokens: int | None, top_logprobs: int | None,
             **prompt) -> GenerationRequest:
    """`top_logprobs`: None = no logprobs; 0 = the chosen token's only (the engine is asked for one
    alternative, which the response leaves out)."""
    mix = tuple(AdapterWeight(a.name, a.weight) for a in body.adapters or ())
    if body.adapters is not None and not mix:
        raise InvalidArgument("adapters: the list is empty", field="adapters")
    names.check_mix(mix)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return GenerationRequest(
        **prompt, adapter=names.adapter_for(body.model, bool(mix)), adapters=mix,
        merge_method=MergeMethod(body.merge_method or "linear"),
        density=0.5 if body.density is None else body.density,
        sampling=SamplingParams(
            temperature=OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty, seed=body.seed),
        stopping=StoppingCriteria(max_new_tokens=max_tokens or 0, stop_sequences=stop, ignore_eos=body.ignore_eos),
        top_logprobs=0 if top_logprobs is None else max(top_logprobs, 1), deadline=deadline)


def _check_neutral(body) -> None:
    for name, neutral in _NEUTRAL.items():
        value = getattr(body, name, None)
        if value is not None and value != neutral:
            raise InvalidArgument(f"{name}: only {neutral!r} is supported, got {value!r}", field=name)


def _prompt(prompt) -> tuple[str | None, tuple[int, ...] | None]:
    """One prompt per request: a string, a list of token ids, or a one-element list of either."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidArgument(f"prompt: one prompt per request, got a list of {len(prompt)}", field="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, None
    return None, tuple(prompt)


def _content(content, index: int) -> str:
    if content is None:
        raise InvalidArgument(f"messages[{index}].content: missing", field=f"messages[{index}].content")
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)
