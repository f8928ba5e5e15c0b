"""Training data from JSONL: the four forms, detected from the first record, validated line by line.

    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    instruction        {"instruction": "...", "input": "..." (optional), "output": "...", "system": "..." (optional)}
    prompt/completion  {"prompt": "...", "completion": "..."}
    text               {"text": "..."}

Chat and instruction records are rendered with the base's chat template (encode.py) and train on the
assistant turns; prompt/completion trains on the completion; text trains on everything. A file holds one
form; a bad line raises DataError naming the file, the line and the key.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.errors import LoraplexError

ROLES = ("system", "user", "assistant")
FORMS = {  # form -> (required keys, optional keys); detection tries them in this order
    "chat": (("messages",), ()),
    "instruction": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}


class DataError(LoraplexError):
    """A training file is unusable; the message names the file, the line and the key."""

    code = "INVALID_ARGUMENT"

    def __init__(self, path: str | Path, message: str, line: int | None = None, key: str | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"key {key!r}: " if key else ""
        super().__init__(f"{where}: {what}{message}", field=key)
        self.path, self.line, self.key = str(path), line, key


@dataclass(frozen=True, slots=True)
class Example:
    """One record in a form-independent shape."""

    line: int
    """Line number in its file, for messages about this example."""
    messages: tuple[tuple[str, str], ...] = ()
    """(role, content) turns: chat and instruction forms."""
    prompt: str = ""
    """Untrained prefix: prompt/completion form."""
    completion: str = ""
    """Trained text: the completion, or the whole text of the text form."""


@dataclass(frozen=True, slots=True)
class DataFile:
    path: str
    sha256: str
    form: str
    examples: tuple[Example, ...]


def read_jsonl(path: str | Path) -> DataFile:
    """Parse and validate every line; blank lines are skipped."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc.strerror or exc})") from None
    form, first_line, examples = None, None, []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not UTF-8 ({exc.reason} at byte {exc.start})", number) from None
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", number) from None
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, got {type(record).__name__}", number)
        if form is None:
            form, first_line = _detect_form(path, number, record), number
        examples.append(_parse(path, number, record, form, first_line))
    if not examples:
        raise DataError(path, "no examples (the file is empty)" if not raw.strip() else "no examples")
    return DataFile(str(path), hashlib.sha256(raw).hexdigest(), form, tuple(examples))


def _detect_form(path: Path, line: int, record: dict) -> str:
    for form, (required, _) in FORMS.items():
        if all(k in record for k in required):
            return form
    found = ", ".join(sorted(record)) or "none"
    raise DataError(path, "no known form: expected 'messages' (chat), 'instruction' + 'output', "
                          f"'prompt' + 'completion' or 'text'; keys found: {found}", line)


def _parse(path: Path, line: int, record: dict, form: str, first_line: int) -> Example:
    required, optional = FORMS[form]
    for key in required:
        if key not in record:
            raise DataError(path, f"missing ({form} form, detected from line {first_line}, needs "
                                  f"{', '.join(required)})", line, key)
    if form == "chat":
        return Example(line, messages=_messages(path, line, record["messages"]))
    for key in required + optional:
        if key in record and not isinstance(record[key], str):
            raise DataError(path, f"expected a string, got {_type(record[key])}", line, key)
    trained = {"instruction": "output", "prompt_completion": "completion", "text": "text"}[form]
    if not record[trained].strip():
        raise DataError(path, "empty: nothing to learn", line, trained)
    if form == "instruction":
        if not record["instruction"].strip():
            raise DataError(path, "empty", line, "instruction")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        turns = ((("system", record["system"]),) if record.get("system") else ()) + (
            ("user", user), ("assistant", record["output"]))
        return Example(line, messages=turns)
    if form == "prompt_completion":
        return Example(line, prompt=record["prompt"], completion=record["completion"])
    return Example(line, completion=record["text"])


def _messages(path: Path, line: int, messages) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(path, f"expected a non-empty list of messages, got {_type(messages)}", line, "messages")
    turns = []
    for i, message in enumerate(messages):
        key = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(path, f"expected an object with role and content, got {_type(message)}", line, key)
        for field in ("role", "content"):
            if field not in message:
                raise DataError(path, "missing", line, f"{key}.{field}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(path, f"{role!r} is not one of {', '.join(ROLES)}", line, f"{key}.role")
        if not isinstance(content, str):
            raise DataError(path, f"expected a string, got {_type(content)}", line, f"{key}.content")
        turns.append((role, content))
    if not any(role == "assistant" and content.strip() for role, content in turns):
        raise DataError(path, "no non-empty assistant message: nothing to learn", line, "messages")
    return tuple(turns)


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def split_eval(examples: tuple[Example, ...], fraction: float, seed: int) -> tuple[tuple, tuple]:
    """(train, eval): a seeded random `fraction` held out (at least one, never all); nothing when < 2 examples."""
    if fraction <= 0 or len(examples) < 2:
        return examples, ()
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:num_eval])
    return (tuple(e for i, e in enumerate(examples) if i not in held),
            tuple(e for i, e in enumerate(examples) if i in held))
