"""The one adapter-name rule, for the server's registry, `train --register` and export manifests alike.

Names become folder names and cache keys (`name@version`), so they stay plain; one rule here means a name
that `train --register` accepts before training is one the server accepts after it.
"""
from __future__ import annotations

import re

MAX_ADAPTER_NAME = 64
"""Characters (ASCII only, so also bytes)."""
ADAPTER_NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ADAPTER_NAME - 1}}}")
ADAPTER_NAME_RULE = f"1-{MAX_ADAPTER_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_adapter_name(name: object) -> bool:
    return isinstance(name, str) and ADAPTER_NAME_PATTERN.fullmatch(name) is not None


def adapter_name_problem(name: object) -> str | None:
    """None for a valid name, else one line saying what is wrong (a long name is cut when shown)."""
    if is_adapter_name(name):
        return None
    text = name if isinstance(name, str) else ""
    shown = repr(text) if len(text) <= 80 else repr(text[:80]) + "..."
    length = f"; this one has {len(text)} characters" if len(text) > MAX_ADAPTER_NAME else ""
    return f"{shown} is not a valid adapter name ({ADAPTER_NAME_RULE}{length})"
