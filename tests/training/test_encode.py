"""Tokens and labels with the embedded model's tokenizer: loss only on what the model should say."""
from __future__ import annotations

import pytest

from loraplex.training.data import DataError, Example
from loraplex.training.encode import IGNORE, encode_examples

CHAT = Example(1, messages=(("user", "What is 2+2?"), ("assistant", "FOUR.")))


def trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE])


def test_chat_trains_on_the_assistant_turn_only(smol_tokenizer):
    [enc], stats = encode_examples((CHAT,), smol_tokenizer, 256, "c.jsonl")
    rendered = smol_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"},
                                                   {"role": "assistant", "content": "FOUR."}], tokenize=False)
    assert list(enc.input_ids) == smol_tokenizer(rendered, add_special_tokens=False).input_ids  # as served
    assert trained_text(smol_tokenizer, enc) == "FOUR.<|im_end|>\n"
    assert all(l == t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE)
    assert stats.kept == 1 and stats.trained_tokens == sum(l != IGNORE for l in enc.labels)


def test_multi_turn_chat_trains_every_assistant_turn(smol_tokenizer):
    example = Example(1, messages=(("system", "Be terse."), ("user", "Hi"), ("assistant", "HELLO."),
                                   ("user", "Bye"), ("assistant", "GOODBYE.")))
    [enc], _ = encode_examples((example,), smol_tokenizer, 256, "c.jsonl")
    assert trained_text(smol_tokenizer, enc) == "HELLO.<|im_end|>\nGOODBYE.<|im_end|>\n"
    assert "Be terse" not in trained_text(smol_tokenizer, enc)


def test_instruction_records_use_the_chat_template(smol_tokenizer):
    example = Example(1, messages=(("user", "Translate.\n\nbonjour"), ("assistant", "hello")))
    [enc], _ = encode_examples((example,), smol_tokenizer, 256, "i.jsonl")
    text = smol_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nTranslate.\n\nbonjour<|im_end|>" in text
    assert trained_text(smol_tokenizer, enc) == "hello<|im_end|>\n"


def test_prompt_completion_trains_on_the_completion_and_eos(smol_tokenizer):
    example = Example(1, prompt="The capital of France is", completion=" Paris.")
    [enc], _ = encode_examples((example,), smol_tokenizer, 256, "p.jsonl")
    assert smol_tokenizer.decode(enc.input_ids) == "The capital of France is Paris." + smol_tokenizer.eos_token
    assert trained_text(smol_tokenizer, enc) == " Paris." + smol_tokenizer.eos_token


def test_text_trains_on_everything_but_the_first_token(smol_tokenizer):
    [enc], _ = encode_examples((Example(1, completion="Once upon a time."),), smol_tokenizer, 256, "t.jsonl")
    assert enc.labels[0] == IGNORE  # nothing predicts the first token
    assert list(enc.labels[1:]) == list(enc.input_ids[1:])
    assert enc.input_ids[-1] == smol_tokenizer.eos_token_id


def test_truncation_is_counted_and_empty_examples_dropped(smol_tokenizer):
    long_answer = Example(1, messages=(("user", "Count."), ("assistant", " ".join(["one"] * 200))))
    long_prompt = Example(2, messages=(("user", "word " * 300), ("assistant", "OK.")))
    encoded, stats = encode_examples((CHAT, long_answer, long_prompt), smol_tokenizer, 64, "d.jsonl")
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert all(len(e.input_ids) <= 64 for e in encoded)
    assert stats.longest > 300 and "1 cut at max_length=64, 1 dropped" in stats.describe()


def test_everything_truncated_is_an_error(smol_tokenizer):
    long_prompt = Example(7, messages=(("user", "word " * 100), ("assistant", "OK.")))
    with pytest.raises(DataError, match=r"d\.jsonl: every example lost all its trained tokens to truncation at "
                                        r"max_length=32 \(longest example: \d+ tokens\); raise --max-length"):
        encode_examples((long_prompt, long_prompt), smol_tokenizer, 32, "d.jsonl")


def test_a_template_that_rejects_the_conversation_names_the_line(smol_tokenizer):
    import copy

    tok = copy.copy(smol_tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"c\.jsonl:1: key 'messages': the chat template rejects this conversation"):
        encode_examples((CHAT,), tok, 64, "c.jsonl")
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template; use the prompt/completion or text form"):
        encode_examples((CHAT,), tok, 64, "c.jsonl")
