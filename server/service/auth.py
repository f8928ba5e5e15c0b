"""Bearer tokens, checked the same way for gRPC metadata and HTTP headers.

A missing token is UNAUTHENTICATED and a wrong one PERMISSION_DENIED; tokens are compared in
constant time against every accepted one (no early exit, so timing shows nothing).
"""
from __future__ import annotations

import hmac

from ..errors import PermissionDenied, Unauthenticated


def bearer(authorization: str | bytes | None) -> str | None:
    """The token of an `authorization` value, or None when there is none (no header, another scheme, empty)."""
    if authorization is None:
        return None
    value = authorization.decode() if isinstance(authorization, bytes) else authorization
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_bearer(authorization: str | bytes | None, tokens: tuple[str, ...] | list[str], where: str) -> None:
    """Raises Unauthenticated / PermissionDenied unless `tokens` is empty or the value presents one of them."""
    if not tokens:
        return
    presented = bearer(authorization)
    if presented is None:
        raise Unauthenticated(f"authorization: this call needs {where}", field="authorization")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented.encode(), token.encode())
    if not matched:
        raise PermissionDenied("authorization: the bearer token is not accepted here", field="authorization")
