"""Say what is wrong with request bytes that protobuf refused to decode, naming the field.

protobuf's DecodeError says only "Wire format was corrupt" or "String field had bad UTF-8". This
walks the wire format beside the message's descriptor and names the first problem: the field path
(`messages.messages[1].content: not valid UTF-8`), or where the bytes stop making sense. The walk is
bounded (MAX_FIELDS fields, MAX_DEPTH nesting), so a hostile 16 MB message costs milliseconds.
"""
from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

MAX_FIELDS = 20_000
MAX_DEPTH = 64
_VARINT, _I64, _LEN, _START_GROUP, _END_GROUP, _I32 = 0, 1, 2, 3, 4, 5


class _Found(Exception):
    """Carries the description of the first problem out of the walk."""


class _Budget:
    def __init__(self):
        self.fields = 0

    def spend(self) -> None:
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise _Found("")


def diagnose(descriptor: Descriptor, data: bytes) -> str | None:
    """The first problem in `data` read as `descriptor`, or None when none is found within the bounds."""
    try:
        _walk(descriptor, memoryview(data), "", 0, _Budget())
    except _Found as found:
        return str(found) or None
    except Exception:  # a diagnosis must never turn a clear refusal into an internal error
        return None
    return None


def largest_field(descriptor: Descriptor, data: bytes) -> tuple[str, int] | None:
    """(name, bytes) of the largest length-delimited top-level field, from the tags alone (payloads are
    skipped, not read): what to name when a message is refused for its size."""
    view, pos, best, budget = memoryview(data), 0, None, _Budget()
    try:
        while pos < len(view):
            budget.spend()
            tag, pos = _varint(view, pos, "message")
            number, wire = tag >> 3, tag & 7
            if wire == _VARINT:
                _, pos = _varint(view, pos, "message")
            elif wire in (_I64, _I32):
                pos += 8 if wire == _I64 else 4
            elif wire == _LEN:
                length, pos = _varint(view, pos, "message")
                field = descriptor.fields_by_number.get(number)
                if best is None or length > best[1]:
                    best = (field.name if field is not None else f"<field {number}>", length)
                pos += length
            else:
                break
    except _Found:
        pass
    return best


def _varint(data: memoryview, pos: int, where: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise _Found(f"{where}: the message ends inside a varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Found(f"{where}: a varint longer than 10 bytes")


def _walk(descriptor: Descriptor | None, data: memoryview, path: str, depth: int, budget: _Budget) -> None:
    if depth > MAX_DEPTH:
        raise _Found(f"{path or 'message'}: nested deeper than {MAX_DEPTH} levels")
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        budget.spend()
        start = pos
        tag, pos = _varint(data, pos, f"{path or 'message'} (byte {start})")
        number, wire = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number) if descriptor is not None else None
        index = seen.get(number, 0)
        seen[number] = index + 1
        name = path + (field.name if field is not None else f"<field {number}>")
        if field is not None and field.is_repeated:
            name += f"[{index}]"
        if number == 0:
            raise _Found(f"{path or 'message'}: field number 0 at byte {start} (the bytes are not a protobuf message)")
        if wire == _VARINT:
            _, pos = _varint(data, pos, name)
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            if pos > len(data):
                raise _Found(f"{name}: the message ends inside a fixed-size value")
        elif wire == _LEN:
            length, pos = _varint(data, pos, name)
            if pos + length > len(data):
                raise _Found(f"{name}: a length of {length} bytes runs past the end of the message")
            payload, pos = data[pos:pos + length], pos + length
            if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                try:
                    bytes(payload).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _Found(f"{name}: not valid UTF-8 (byte {exc.start} of the string)") from None
            elif field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                _walk(field.message_type, payload, name + ".", depth + 1, budget)
        elif wire == _START_GROUP:
            pos = _skip_group(data, pos, number, name, depth, budget)
        elif wire == _END_GROUP:
            raise _Found(f"{name}: an end-group tag with no group open (byte {start})")
        else:
            raise _Found(f"{name}: wire type {wire} does not exist (byte {start})")


def _skip_group(data: memoryview, pos: int, number: int, name: str, depth: int, budget: _Budget) -> int:
    """Past the end-group tag that closes group `number` (groups are not used by loraplex's messages)."""
    open_groups = [number]
    while open_groups:
        if len(open_groups) + depth > MAX_DEPTH:
            raise _Found(f"{name}: groups nested deeper than {MAX_DEPTH} levels")
        budget.spend()
        tag, pos = _varint(data, pos, name)
        inner, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, pos = _varint(data, pos, name)
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        elif wire == _LEN:
            length, pos = _varint(data, pos, name)
            pos += length
        elif wire == _START_GROUP:
            open_groups.append(inner)
        elif wire == _END_GROUP:
            if open_groups.pop() != inner:
                raise _Found(f"{name}: a group closed by the wrong field number")
        else:
            raise _Found(f"{name}: wire type {wire} does not exist")
        if pos > len(data):
            raise _Found(f"{name}: the message ends inside a group")
    return pos
