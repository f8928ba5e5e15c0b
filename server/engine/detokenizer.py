"""Incremental detokenization: one text delta per generated token, at a cost independent of length.

The TGI / vLLM prefix_offset / read_offset scheme. Decoding a token alone is wrong (SentencePiece
drops a leading space, byte-level BPE splits one character over several tokens), so each push
decodes a short window: ids[prefix_offset:read_offset] is text already emitted, kept as context,
and ids[prefix_offset:] is that plus the new tokens; the difference is the delta. While the window
ends in U+FFFD (an incomplete UTF-8 character) the delta is held back and the window grows.
"""
from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Concatenated `push` deltas (plus `flush`) == tokenizer.decode(all ids, skip_special_tokens)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # only the window: ids before prefix_offset are dropped
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while held back)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # a skipped special token, or a character still missing bytes
        # The emitted window becomes the next context; drop what is before it.
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text still held back when the sequence ends (e.g. a final incomplete character, as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
