"""Incremental detokenizer and stop strings, on the embedded model's real tokenizer."""
from __future__ import annotations

import random

import pytest

from loraplex.server.engine.detokenizer import IncrementalDetokenizer
from loraplex.server.engine.stop import StopChecker
from loraplex.server.errors import InvalidArgument

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "Café, naïve, crème brûlée, Ångström, señor",
    "日本語のテキストと中文文本，还有한국어。",
    "Emoji: 🦙🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 done",
    "def f(x):\n    if x  >  1:\n\t\treturn [x ** 2 for _ in range(3)]  # two  spaces\n\n\n    return None\n",
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>assistant\nOK 👍<|im_end|><|endoftext|>",
    "   leading spaces and trailing   ",
]


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_dir))


def stream(tokenizer, ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detok.push(i) for i in ids], detok.flush()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tokenizer, text, skip_special_tokens):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, tail = stream(tokenizer, ids, skip_special_tokens)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert tail == ""  # valid text: nothing left held back
    assert not any("\ufffd" in d for d in deltas)  # never streams half a character


def test_special_tokens_are_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("hi<|im_end|>", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids, True)[0]) == "hi"
    assert "".join(stream(tokenizer, ids, False)[0]) == "hi<|im_end|>"


def test_multi_token_character_is_held_then_emitted_whole(tokenizer):
    ids = tokenizer.encode("a🦙b", add_special_tokens=False)
    assert len(ids) >= 4  # the llama emoji is several byte tokens: the case this test is about
    deltas, _ = stream(tokenizer, ids)
    assert "" in deltas and "🦙" in deltas
    assert "".join(deltas) == "a🦙b"


def test_random_token_streams_with_invalid_utf8(tokenizer):
    """Arbitrary ids (byte tokens that never form characters, special tokens): deltas + flush == decode."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(40):
        ids = [rng.randrange(vocab) if rng.random() < 0.6 else rng.randrange(256) for _ in range(rng.randrange(1, 60))]
        for skip in (True, False):
            deltas, tail = stream(tokenizer, ids, skip)
            assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=skip), ids


class RecordingTokenizer:
    """The real tokenizer, recording how many ids each decode call gets (a spy, not a stand-in)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decode_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.decode_lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_per_token_cost_is_independent_of_length(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    assert len(ids) > 2000
    spy = RecordingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(spy)
    text = "".join(detok.push(i) for i in ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(spy.decode_lengths) <= 8  # a window of a few tokens, not the sequence
    assert len(detok._ids) <= 8


# ---- stop strings ----

def run_stop(stops, deltas):
    checker = StopChecker(stops)
    emitted, stopped_at = [], None
    for i, d in enumerate(deltas):
        text, stopped = checker.feed(d)
        emitted.append(text)
        if stopped:
            stopped_at = i
            break
    return emitted, stopped_at, checker


def test_stop_inside_one_delta():
    emitted, at, _ = run_stop(["STOP"], ["Hello STOP world"])
    assert emitted == ["Hello "] and at == 0


def test_stop_spanning_deltas_is_held_back_then_cut():
    emitted, at, _ = run_stop(["STOP"], ["Hel", "lo S", "T", "OP more", "never"])
    assert emitted == ["Hel", "lo ", "", ""] and at == 3


def test_false_alarm_is_released():
    emitted, at, checker = run_stop(["###"], ["a#", "#b", "c"])
    assert emitted == ["a", "##b", "c"] and at is None
    assert checker.flush() == ""


def test_flush_returns_held_text():
    emitted, at, checker = run_stop(["</answer>"], ["42 </ans"])
    assert emitted == ["42 "] and at is None
    assert checker.flush() == "</ans"
    assert checker.flush() == ""


def test_earliest_stop_wins_and_feed_after_stop_is_empty():
    emitted, at, checker = run_stop(["world", "o w"], ["hello world"])
    assert emitted == ["hell"] and at == 0
    assert checker.feed("more") == ("", True)
    assert run_stop(["abc"], ["abc"])[0] == [""]  # stop at the very start


def test_no_stop_sequences_pass_through():
    emitted, at, checker = run_stop([], ["a", "b#", ""])
    assert emitted == ["a", "b#", ""] and at is None and checker.flush() == ""


@pytest.mark.parametrize("bad", [[""], ["ok", ""]])
def test_empty_stop_string_is_invalid(bad):
    with pytest.raises(InvalidArgument) as err:
        StopChecker(bad)
    assert err.value.field == "stopping.stop_sequences" and "stopping.stop_sequences" in str(err.value)


@pytest.mark.parametrize("stops", [["aab"], ["ab", "abc", "bca"], ["\n\nUser:", "<end>"], ["🦙!"]])
def test_any_split_streams_text_up_to_the_first_stop(stops):
    """For every random split into deltas: streamed text == text before the earliest stop (else all of it),
    and no emitted prefix ever contains the start of a stop that later matched."""
    rng = random.Random(1)
    texts = ["xaaab tail", "zzabcab", "xbcay", "answer 42\n\nUser: next<end>", "no stop here \n\nUse", "🦙🦙! x", "aa"]
    for text in texts:
        starts = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[:min(starts)] if starts else text
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randrange(0, 6))))
            deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            emitted, at, checker = run_stop(stops, deltas)
            out = "".join(emitted)
            assert (at is not None) == bool(starts), (text, deltas)
            if at is None:
                out += checker.flush()
            assert out == expected, (text, deltas, emitted)


def test_detokenizer_into_stop_checker(tokenizer):
    """The engine's pipeline on real tokens: a stop string spanning several tokens, cut before it."""
    text = "The answer is 42.\n\nUser: what else?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok, checker = IncrementalDetokenizer(tokenizer), StopChecker(["\n\nUser:"])
    pieces, stopped_after = [], None
    for n, i in enumerate(ids, 1):
        piece, stopped = checker.feed(detok.push(i))
        pieces.append(piece)
        if stopped:
            stopped_after = n
            break
    assert "".join(pieces) == "The answer is 42."
    assert tokenizer.decode(ids[:stopped_after - 1]) != tokenizer.decode(ids[:stopped_after])
    assert "User:" in tokenizer.decode(ids[:stopped_after]) and "User:" not in tokenizer.decode(ids[:stopped_after - 1])
    assert any(p == "" for p in pieces[:-1])  # "\n\n" was held back while it could start the stop string
