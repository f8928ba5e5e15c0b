"""OutputProcessor: after a step, turn sampled token ids into text chunks, stops and finishes.

Per sampled sequence the work is O(1) Python plus its detokenizer's step: append the token,
detokenize incrementally, apply EOS / max-token / stop-string rules, emit a chunk. Sequences that
end are returned as `Finished` records; the engine core frees their resources and emits the final
chunk through `final_chunk`, so resource bookkeeping stays in one place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..types import GenerationChunk, StopReason, TokenLogprob
from .detokenizer import IncrementalDetokenizer
from .sequence import Sequence
from .stop import StopChecker


@dataclass(frozen=True, slots=True)
class SampledTokens:
    """What one step sampled, on the host: row i belongs to sequences[i]."""

    sequences: list[Sequence]
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    seq: Sequence
    reason: StopReason
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: Exception | None = None


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def text_state(self, stop_sequences) -> tuple[IncrementalDetokenizer | None, StopChecker]:
        """A new sequence's detokenizer (None without a tokenizer) and stop checker."""
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        return detok, StopChecker(stop_sequences)

    def process(self, out: SampledTokens) -> list[Finished]:
        """Append and emit every sampled token; returns the sequences this step ended (not yet freed)."""
        finished: list[Finished] = []
        now = time.monotonic()
        for i, seq in enumerate(out.sequences):
            if seq.finished:  # ended while this step was in flight: its token is surplus
                continue
            token = out.token_ids[i]
            seq.output_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            logprobs = self._logprobs(seq, out, i, token)
            reason = StopReason.NOT_FINISHED
            is_eos = token in self.eos_token_ids and not seq.request.stopping.ignore_eos
            delta = seq.detokenizer.push(token) if seq.detokenizer is not None else ""
            if is_eos:
                reason = StopReason.EOS_TOKEN
                delta = ""
            if reason is StopReason.NOT_FINISHED and len(seq.output_ids) >= seq.max_new_tokens:
                reason = StopReason.MAX_TOKENS
                if seq.detokenizer is not None:  # the last token may end in an incomplete character
                    delta += seq.detokenizer.flush()
            text, stopped = seq.stop_checker.feed(delta)
            if stopped:
                reason = StopReason.STOP_SEQUENCE
            if reason is not StopReason.NOT_FINISHED:
                if not stopped:
                    text += seq.stop_checker.flush()
                finished.append(Finished(seq, reason, text=text, token_ids=[token], logprobs=logprobs))
                continue
            seq.handle.emit(GenerationChunk(
                request_id=seq.request_id, text=text, token_ids=[token], logprobs=logprobs,
                input_tokens=len(seq.prompt_ids), generated_tokens=len(seq.output_ids), seed=seq.seed,
                adapter_versions=seq.adapter_versions))
        return finished

    @staticmethod
    def _logprobs(seq: Sequence, out: SampledTokens, i: int, token: int) -> list[TokenLogprob]:
        if seq.request.top_logprobs <= 0 or out.logprobs is None:
            return []
        n = seq.request.top_logprobs
        top = tuple(zip(out.top_ids[i][:n], out.top_logprobs[i][:n])) if out.top_ids is not None else ()
        return [TokenLogprob(token_id=token, logprob=out.logprobs[i], top=top)]

    @staticmethod
    def final_chunk(done: Finished) -> GenerationChunk:
        seq = done.seq
        return GenerationChunk(
            request_id=seq.request_id, text=done.text, token_ids=done.token_ids, logprobs=done.logprobs,
            input_tokens=len(seq.prompt_ids), generated_tokens=len(seq.output_ids), stop_reason=done.reason,
            seed=seq.seed, adapter_versions=seq.adapter_versions, error=done.error)
