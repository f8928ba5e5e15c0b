"""Examples -> token ids and labels: the base's chat template, loss only on what the model should say.

A token is trained when its first character lies in a trained span of the rendered text (an assistant
turn with its end-of-turn marker, a completion, a plain text), found through the fast tokenizer's
character offsets, so the ids are exactly those of tokenizing the whole text at once (as serving
does). Label -100 = not trained. Examples are cut at max_length (counted); one left with nothing to
learn is dropped (counted), and a file where that happens to every example is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

from .data import DataError, Example

IGNORE = -100


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    """Same length; IGNORE where the token is not trained (labels[0] always: nothing predicts it)."""


@dataclass(frozen=True, slots=True)
class EncodeStats:
    examples: int
    kept: int
    truncated: int
    """Cut at max_length but kept (they still have trained tokens)."""
    dropped: int
    """Cut at max_length with no trained token left."""
    tokens: int
    """Input tokens of the kept examples, after truncation."""
    trained_tokens: int
    longest: int
    """Longest example before truncation."""
    max_length: int

    def describe(self) -> str:
        line = f"{self.kept} examples, {self.tokens:,} tokens ({self.trained_tokens:,} trained)"
        if self.truncated or self.dropped:
            line += (f"; {self.truncated} cut at max_length={self.max_length}, {self.dropped} dropped "
                     f"(nothing left to learn; longest {self.longest} tokens)")
        return line


def encode_examples(examples: tuple[Example, ...], tokenizer, max_length: int, path: str) \
        -> tuple[list[Encoded], EncodeStats]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(path, "the base's tokenizer is not a fast (Rust) tokenizer; loraplex train needs its "
                              "character offsets to place the labels")
    encoded, truncated, dropped, longest = [], 0, 0, 0
    for example in examples:
        ids, labels = _tokenize(example, tokenizer, path)
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels[1:]):
                dropped += 1
                continue
            truncated += 1
        encoded.append(Encoded(tuple(ids), (IGNORE, *labels[1:])))
    stats = EncodeStats(
        examples=len(examples), kept=len(encoded), truncated=truncated, dropped=dropped,
        tokens=sum(len(e.input_ids) for e in encoded),
        trained_tokens=sum(label != IGNORE for e in encoded for label in e.labels), longest=longest,
        max_length=max_length)
    if not encoded:
        raise DataError(path, f"every example lost all its trained tokens to truncation at max_length="
                              f"{max_length} (longest example: {longest} tokens); raise --max-length")
    return encoded, stats


def _tokenize(example: Example, tokenizer, path: str) -> tuple[list[int], list[int]]:
    if example.messages:
        text, spans = render_chat(example, tokenizer, path)
        add_special = False  # the template already wrote every special token
    else:
        text = example.prompt + example.completion
        spans = [(len(example.prompt), len(text))]
        add_special = True
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tok if _inside(start, end, spans) else IGNORE
              for tok, (start, end) in zip(ids, enc["offset_mapping"])]
    if not example.messages and tokenizer.eos_token_id is not None:  # learn to stop
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return end > start and any(a <= start < b for a, b in spans)


def render_chat(example: Example, tokenizer, path: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation through the chat template, and the character spans of the assistant turns.

    A turn's span runs from the end of the prompt the template writes before it (the generation prompt)
    to the end of the conversation rendered up to it, so it includes the end-of-turn marker."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(path, "the base's tokenizer has no chat template; use the prompt/completion or text form")
    messages = [{"role": role, "content": content} for role, content in example.messages]
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, (role, _) in enumerate(example.messages):
            if role != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) \
                if i else ""
            through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
                raise DataError(path, "the chat template renders earlier turns differently once later turns "
                                      "follow; loraplex cannot place the assistant labels", example.line, "messages")
            spans.append((len(before), len(through)))
    except DataError:
        raise
    except Exception as exc:  # jinja errors: templates that demand a system prompt, alternating roles...
        raise DataError(path, f"the chat template rejects this conversation ({type(exc).__name__}: {exc})",
                        example.line, "messages") from None
    return full, spans
