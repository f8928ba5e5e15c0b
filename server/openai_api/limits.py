"""A bound on request body size, checked before the body is parsed: what --max-message-bytes is for gRPC.

A body announced larger (Content-Length) is refused at once; one sent without a length is counted as it
arrives and refused once it passes the bound, so no request makes the server hold more than that.
"""
from __future__ import annotations

import json

from .errors import error_body


class BodyLimit:
    """ASGI middleware: 413 with an OpenAI error body past `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        announced = dict(scope.get("headers") or ()).get(b"content-length")
        if announced is not None and announced.isdigit() and int(announced) > self.max_bytes:
            return await self._refuse(send, int(announced))
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(received)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge as too_large:
            if not started:
                await self._refuse(send, too_large.size)

    async def _refuse(self, send, size: int) -> None:
        body = error_body(f"body: {size} bytes or more; this server takes request bodies of at most "
                          f"{self.max_bytes} bytes (--max-message-bytes)", "INVALID_ARGUMENT", None, "body_too_large")
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size
