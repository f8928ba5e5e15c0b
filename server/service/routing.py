"""The `x-loraplex-adapter` routing header: the adapter names of a request, where a proxy can hash on them
without reading the body (nginx `hash $http_x_loraplex_adapter consistent`, Envoy's ring hash).

Clients send it (loraplex.client, hence the CLI; OpenAI clients through `extra_headers`); the server refuses
a header that names other adapters than the body, so that affinity never routes by a lie.
"""
from __future__ import annotations

from typing import Iterable

from ..errors import InvalidArgument
from ..types import GenerationRequest

ROUTING_HEADER = "x-loraplex-adapter"


def routing_value(names: Iterable[str]) -> str:
    """The header's value for these adapter names: joined by ',' ("" for the base model alone)."""
    return ",".join(name for name in names if name)


def request_names(request: GenerationRequest) -> list[str]:
    return [request.adapter] if request.adapter else [a.name for a in request.adapters]


def check_routing_header(header: str | None, request: GenerationRequest) -> None:
    """INVALID_ARGUMENT naming the header when it is sent and names other adapters than the request."""
    if header is None:
        return
    sent = {name.strip().partition("@")[0] for name in header.split(",") if name.strip()}
    asked = {name.partition("@")[0] for name in request_names(request)}
    if sent != asked:
        raise InvalidArgument(f"{ROUTING_HEADER}: the header names {header[:200]!r} but the request asks for "
                              f"{routing_value(sorted(asked)) or 'the base model'!r}; send the request's own adapter "
                              "names (joined by ',' for a mix) or no header", field=ROUTING_HEADER)
