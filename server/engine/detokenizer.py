"""Incremental detokenization: one text delta per generated token, at a cost independent of length.

Decoding a token alone is wrong (SentencePiece drops a leading space, byte-level BPE splits one
character over several tokens), so each push decodes a short window. With a fast tokenizer the
window lives in Rust: `tokenizers`' DecodeStream decodes each token once (about 3 us a token on
the embedded model, 5x the Python window). Other tokenizers use the TGI / vLLM prefix_offset /
read_offset window: ids[prefix_offset:read_offset] is text already emitted, kept as context, and
ids[prefix_offset:] is that plus the new tokens; the difference is the delta. Either way a delta
that would end in U+FFFD (an incomplete UTF-8 character) is held back until it completes.
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
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while held back)."""
        self._ids.append(token_id)
        if self._stream is not None:
            text = self._stream.step(self._backend, token_id)
            if text is None:
                return ""
            # DecodeStream emitted everything up to here: keep a few ids as context for flush().
            del self._ids[:-4]
            self._read_offset = len(self._ids)
            return text
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
        if self._stream is not None and self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
