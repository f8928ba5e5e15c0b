"""After a step: append sampled tokens, detokenize, apply stop rules, emit chunks, finish sequences."""
from __future__ import annotations

import time

from ..types import GenerationChunk, StopReason, TokenLogprob


def process_sampled(engine, out) -> None:
    """Per sampled sequence: O(1) Python work plus its detokenizer's small window."""
    for i, seq in enumerate(out.sampled):
        token = out.token_ids[i]
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        logprobs = []
        if seq.request.top_logprobs > 0 and out.logprobs is not None:
            n = seq.request.top_logprobs
            top = tuple(zip(out.top_ids[i][:n], out.top_logprobs[i][:n])) if out.top_ids is not None else ()
            logprobs = [TokenLogprob(token_id=token, logprob=out.logprobs[i], top=top)]
        reason = StopReason.NOT_FINISHED
        is_eos = token in engine.eos_token_ids and not seq.request.stopping.ignore_eos
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
            engine._finish(seq, reason, text=text, token_ids=[token], logprobs=logprobs)
            continue
        seq.handle.emit(GenerationChunk(
            request_id=seq.request_id, text=text, token_ids=[token], logprobs=logprobs,
            input_tokens=len(seq.prompt_ids), generated_tokens=len(seq.output_ids), seed=seq.seed,
            adapter_versions=seq.adapter_versions))
