"""Stop sequences over streamed text deltas.

A stop string may span several tokens, so text that could still become the start of one is held
back instead of streamed; the emitted text ends right before the stop string, which is not
included (as in vLLM and the OpenAI API). Per feed the work is O(held text x stop strings), and the
held text is shorter than the longest stop string.
"""
from __future__ import annotations

from typing import Iterable

from ..errors import InvalidArgument


class StopChecker:
    def __init__(self, stop_sequences: Iterable[str] = ()):
        self.stop_sequences = tuple(stop_sequences)
        if any(not isinstance(s, str) or not s for s in self.stop_sequences):
            raise InvalidArgument("stopping.stop_sequences must be non-empty strings, got "
                                  f"{list(self.stop_sequences)!r}", field="stopping.stop_sequences")
        self._max_len = max((len(s) for s in self.stop_sequences), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to emit now, whether a stop string was found)."""
        if self.stopped:
            return "", True
        if not self.stop_sequences:
            return delta, False
        text = self._held + delta
        # Earlier feeds found nothing, so any match ends inside `delta`; the earliest start wins.
        found = [i for i in (text.find(s) for s in self.stop_sequences) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return text[:min(found)], True
        keep = self._partial_match_len(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """Held-back text, when the sequence ends for another reason (EOS, max tokens)."""
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop_sequences):
                return n
        return 0
