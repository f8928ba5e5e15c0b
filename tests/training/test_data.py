"""JSONL reading: the four forms are detected; every bad line names the file, the line and the key."""
from __future__ import annotations

import pytest

from loraplex.training.data import DataError, read_jsonl, split_eval

from .conftest import write_jsonl


def test_chat_form(tmp_path):
    f = read_jsonl(write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]}]))
    assert f.form == "chat" and len(f.sha256) == 64
    assert f.examples[0].messages == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))
    assert f.examples[0].line == 1


def test_instruction_form_with_input_and_system(tmp_path):
    f = read_jsonl(write_jsonl(tmp_path / "i.jsonl", [
        {"instruction": "Translate.", "input": "bonjour", "output": "hello", "system": "You translate."},
        {"instruction": "Add.", "output": "4"}]))
    assert f.form == "instruction"
    assert f.examples[0].messages == (("system", "You translate."), ("user", "Translate.\n\nbonjour"),
                                      ("assistant", "hello"))
    assert f.examples[1].messages == (("user", "Add."), ("assistant", "4"))


def test_prompt_completion_and_text_forms(tmp_path):
    pc = read_jsonl(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}]))
    assert pc.form == "prompt_completion" and (pc.examples[0].prompt, pc.examples[0].completion) == ("2+2=", "4")
    text = read_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": "The end."}]))
    assert text.form == "text" and [e.completion for e in text.examples] == ["Once upon a time.", "The end."]


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('\n{"text": "a"}\n\n   \n{"text": 5}\n')
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value) == f"{path}:5: key 'text': expected a string, got int"


@pytest.mark.parametrize("records, raw, expected", [
    ([{"text": "a"}, {"text": "b"}], {2: '{"text": "b",'}, r":2: invalid JSON: .*\(column \d+\)"),
    ([{"text": "a"}, {"text": "b"}], {2: '["text"]'}, ":2: expected a JSON object, got list"),
    ([{"instruction": "q", "output": "a"}, {"instruction": "q"}], None,
     r":2: key 'output': missing \(instruction form, detected from line 1"),
    ([{"prompt": "p", "completion": "c"}, {"text": "t"}], None, ":2: key 'prompt': missing"),
    ([{"question": "q", "answer": "a"}], None, ":1: no known form: .* keys found: answer, question"),
    ([{"messages": "hi"}], None, ":1: key 'messages': expected a non-empty list of messages, got str"),
    ([{"messages": [{"role": "user"}]}], None, r":1: key 'messages\[0\].content': missing"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], None,
     r":1: key 'messages\[0\].role': 'bot' is not one of system, user, assistant"),
    ([{"messages": [{"role": "user", "content": 3}]}], None,
     r":1: key 'messages\[0\].content': expected a string, got int"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], None,
     ":1: key 'messages': no non-empty assistant message"),
    ([{"instruction": "q", "output": "  "}], None, ":1: key 'output': empty: nothing to learn"),
    ([{"instruction": "q", "output": "a", "input": None}], None, ":1: key 'input': expected a string, got null"),
])
def test_bad_lines(tmp_path, records, raw, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", records, raw)
    with pytest.raises(DataError, match=expected) as info:
        read_jsonl(path)
    assert str(info.value).startswith(str(path))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: no examples \(the file is empty\)"):
        read_jsonl(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(blank)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=":1: not UTF-8"):
        read_jsonl(latin)


def test_split_eval_is_seeded_and_never_empties_train(tmp_path):
    f = read_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": str(i)} for i in range(20)]))
    train, held = split_eval(f.examples, 0.1, seed=3)
    assert len(train) == 18 and len(held) == 2
    assert split_eval(f.examples, 0.1, seed=3) == (train, held)
    assert split_eval(f.examples, 0.1, seed=4) != (train, held)
    assert {e.line for e in train} | {e.line for e in held} == set(range(1, 21))
    assert split_eval(f.examples[:1], 0.5, seed=0) == (f.examples[:1], ())
    assert len(split_eval(f.examples[:2], 0.9, seed=0)[0]) == 1
