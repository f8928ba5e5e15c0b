"""`--adapter-source PATTERN=SOURCE`: which source an adapter name not yet registered is loaded from on first use.

Like LoRAX's per-request adapter ids, but decided by the server: a request for `acme-legal` under
`--adapter-source 'acme-*=hf://acme/{name}'` registers hf://acme/acme-legal the first time it is asked
for. PATTERN is a shell-style glob over adapter names (fnmatch, case-sensitive); SOURCE is any source
RegisterAdapter takes (a folder inside the adapter roots, hf://..., s3://...), with `{name}` replaced
by the name. The first rule that matches wins. Names are checked (check_name) before they are put
into a source, so a name can never add a path component or a URL part of its own.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .names import is_adapter_name


@dataclass(frozen=True, slots=True)
class SourceRule:
    pattern: str
    """Glob over adapter names, e.g. `acme-*`."""
    template: str
    """Source with `{name}` where the adapter name goes, e.g. `s3://adapters/{name}`."""

    def source_for(self, name: str) -> str | None:
        if not is_adapter_name(name) or not fnmatch.fnmatchcase(name, self.pattern):
            return None
        return self.template.replace("{name}", name)


def parse_rule(text: str) -> SourceRule:
    """`PATTERN=SOURCE` -> SourceRule; ValueError saying what is wrong."""
    pattern, equals, template = text.partition("=")
    if not equals or not pattern.strip() or not template.strip():
        raise ValueError(f"adapter source {text!r}: expected PATTERN=SOURCE, e.g. 'acme-*=s3://adapters/{{name}}'")
    return SourceRule(pattern.strip(), template.strip())


def source_for(rules: tuple[SourceRule, ...], name: str) -> str | None:
    """The source the first matching rule gives `name`, or None when no rule takes it."""
    for rule in rules:
        source = rule.source_for(name)
        if source is not None:
            return source
    return None
