"""GenerationChunks -> OpenAI response objects: completions and chat completions, whole or as stream chunks.

Token strings in logprobs are each token decoded alone (OpenAI's convention), with its UTF-8 bytes
for chat. `top` is how many alternatives the client asked for (0: the chosen token's logprob only).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ..service.convert import adapter_version
from ..types import GenerationChunk, StopReason, TokenLogprob

FINISH_REASONS = {StopReason.MAX_TOKENS: "length", StopReason.EOS_TOKEN: "stop", StopReason.STOP_SEQUENCE: "stop"}


@dataclass(frozen=True, slots=True)
class Rendering:
    """What every response of one request shares."""

    chat: bool
    model: str
    """Echoed as the client named it."""
    tokenizer: object
    logprobs: bool
    top: int
    created: int

    @classmethod
    def of(cls, chat: bool, model: str, tokenizer, logprobs: bool, top: int) -> "Rendering":
        return cls(chat, model, tokenizer, logprobs, top, int(time.time()))

    def _head(self, request_id: str, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + request_id, "object": kind, "created": self.created,
                "model": self.model}

    def whole(self, chunks: list[GenerationChunk]) -> dict:
        """One response for a finished request."""
        last = chunks[-1]
        text = "".join(c.text for c in chunks)
        logprobs = [lp for c in chunks for lp in c.logprobs]
        choice = {"index": 0, "finish_reason": FINISH_REASONS.get(last.stop_reason),
                  "logprobs": self._logprobs(logprobs, 0) if self.logprobs else None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(last.request_id, False), "choices": [choice], "usage": usage(last),
                "system_fingerprint": _fingerprint(last)}

    def stream_chunk(self, chunk: GenerationChunk, first: bool, offset: int) -> dict | None:
        """One stream event for a chunk (None when it carries nothing); `offset` = text characters sent so far."""
        finish = FINISH_REASONS.get(chunk.stop_reason)
        if not (chunk.text or finish or first or (self.logprobs and chunk.logprobs)):
            return None
        choice = {"index": 0, "finish_reason": finish,
                  "logprobs": self._logprobs(chunk.logprobs, offset) if self.logprobs else None}
        if self.chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": chunk.text} if chunk.text or first
                                                                         else {})
        else:
            choice["text"] = chunk.text
        return {**self._head(chunk.request_id, True), "choices": [choice], "system_fingerprint": _fingerprint(chunk)}

    def usage_chunk(self, last: GenerationChunk) -> dict:
        """The extra last event of `stream_options: {"include_usage": true}`."""
        return {**self._head(last.request_id, True), "choices": [], "usage": usage(last)}

    def _logprobs(self, logprobs: list[TokenLogprob], offset: int) -> dict:
        decode = self.tokenizer.decode
        if self.chat:
            return {"content": [{**_token(decode([lp.token_id]), lp.logprob),
                                 "top_logprobs": [_token(decode([t]), p) for t, p in lp.top[:self.top]]}
                                for lp in logprobs]}
        tokens = [decode([lp.token_id]) for lp in logprobs]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{decode([t]): p for t, p in lp.top[:self.top]} for lp in logprobs]
                if self.top else None, "text_offset": offsets}


def usage(last: GenerationChunk) -> dict:
    return {"prompt_tokens": last.input_tokens, "completion_tokens": last.generated_tokens,
            "total_tokens": last.input_tokens + last.generated_tokens}


def sse(event: dict | str) -> bytes:
    """One server-sent event (`data: [DONE]` for the string)."""
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _fingerprint(chunk: GenerationChunk) -> str | None:
    """Which adapter versions served the request (`caps@2,pirate@1`), as gRPC's adapter_version."""
    return adapter_version(chunk.adapter_versions) or None
