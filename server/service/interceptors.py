"""Server interceptors: bearer-token auth per service, undecodable requests, and loraplex errors ->
gRPC status codes.

Errors carry the name of their grpc.StatusCode in `.code` (server/errors.py); anything else that
escapes a handler is a bug: logged with its traceback and sent as INTERNAL. Messages sent to clients
never show the server's own folders (the state dir): they are replaced by `<state dir>`. Health and
reflection are never behind a token (load balancers and `grpcurl list` must reach them).

Request bytes that protobuf cannot decode (corrupt wire format, invalid UTF-8 in a string field)
would otherwise end as UNKNOWN "Unexpected <class DecodeError>" from grpc itself: DecodeInterceptor
makes every method's deserializer hand the failure to the handler instead, which answers
INVALID_ARGUMENT naming the field (service/wire.py), for every service, health and reflection too.
"""
from __future__ import annotations

import logging

import grpc

from ..errors import LoraplexError
from .auth import check_bearer
from .wire import diagnose, largest_field

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "/loraplex.v1."
ADMIN_PREFIX = "/loraplex.v1.Adapters/"
GENERATION_PREFIX = "/loraplex.v1.Generation/"


def status_code(exc: LoraplexError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


def _replace_behavior(handler: grpc.RpcMethodHandler, wrap, deserializer=None) -> grpc.RpcMethodHandler:
    """The same method handler with its behaviour passed through `wrap(behavior, streaming_response)`
    (and its request deserializer replaced by `deserializer(old)` when given)."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
             ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
             ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
             ("stream_stream", grpc.stream_stream_rpc_method_handler, True))
    for attribute, make, streaming in kinds:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            request_deserializer = handler.request_deserializer
            if deserializer is not None:
                request_deserializer = deserializer(request_deserializer)
            return make(wrap(behavior, streaming), request_deserializer=request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


class Scrubber:
    """Replaces the server's own folders in client-bound messages (longest first) by a placeholder."""

    def __init__(self, hidden: dict[str, str] | None = None):
        self.hidden = sorted(((path, label) for path, label in (hidden or {}).items() if path),
                             key=lambda item: len(item[0]), reverse=True)

    def __call__(self, message: str) -> str:
        for path, label in self.hidden:
            message = message.replace(path, label)
        return message


FIELD_METADATA = "loraplex-field"
"""Trailing metadata naming the request field an error is about (loraplex.client reads it)."""


def field_metadata(exc: LoraplexError) -> tuple[tuple[str, str], ...]:
    return ((FIELD_METADATA, exc.field),) if exc.field else ()


async def _abort_for(exc: Exception, context, method: str, scrub: Scrubber):
    if isinstance(exc, LoraplexError):
        await context.abort(status_code(exc), scrub(str(exc)), field_metadata(exc))
    log.error("%s failed with an unexpected error", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, scrub(f"internal error: {type(exc).__name__}: {exc}"))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps LoraplexError to its status code and anything else to INTERNAL, for loraplex's services."""

    def __init__(self, scrub: Scrubber | None = None):
        self.scrub = scrub or Scrubber()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PACKAGE_PREFIX):
            return handler
        method = details.method

        def wrap(behavior, streaming):
            if streaming:
                async def stream(request, context):
                    try:
                        async for response in behavior(request, context):
                            yield response
                    except (grpc.aio.AbortError, grpc.aio.UsageError):
                        raise
                    except Exception as exc:
                        await _abort_for(exc, context, method, self.scrub)
                return stream

            async def unary(request, context):
                try:
                    return await behavior(request, context)
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as exc:
                    await _abort_for(exc, context, method, self.scrub)
            return unary

        return _replace_behavior(handler, wrap)


class Undecodable:
    """What a tolerant deserializer returns for bytes protobuf refused, or for a message over the method's
    size limit (never parsed), in place of the message."""

    __slots__ = ("descriptor", "data", "error", "limit")

    def __init__(self, descriptor, data: bytes, error: Exception | None, limit: int | None = None):
        self.descriptor, self.data, self.error, self.limit = descriptor, data, error, limit

    def message(self) -> str:
        if self.error is None:  # too large
            found = largest_field(self.descriptor, self.data) if self.descriptor is not None else None
            name, size = found or ("request", len(self.data))
            return (f"{name}: {size} bytes, in a request of {len(self.data)} bytes; this method takes requests of "
                    f"at most {self.limit} bytes (more text than that cannot fit the server's context)")
        what = self.descriptor.full_name if self.descriptor is not None else "the request message"
        where = diagnose(self.descriptor, self.data) if self.descriptor is not None else None
        detail = where or f"{type(self.error).__name__}: {self.error}"
        return f"request: the bytes cannot be decoded as {what}: {detail}"


def _tolerant(deserializer, limit: int | None = None):
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def deserialize(data: bytes):
        if limit is not None and len(data) > limit:
            return Undecodable(descriptor, data, None, limit)  # refused unparsed: no work for its size
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything else a deserializer may raise on bad bytes
            return Undecodable(descriptor, data, exc)
    return deserialize


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable request bytes -> INVALID_ARGUMENT naming the field, on every method (see module doc).

    `limit_for(method)`: the largest request message that method can usefully take (None: the server's
    overall limit); a bigger one is refused without being parsed, naming its largest field.
    """

    def __init__(self, limit_for=None):
        self.limit_for = limit_for

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        limit = self.limit_for(details.method) if self.limit_for is not None else None

        def wrap(behavior, streaming):
            streaming_request = handler.stream_unary is not None or handler.stream_stream is not None

            def checked(request_or_iterator):
                if not streaming_request:
                    if isinstance(request_or_iterator, Undecodable):
                        raise _Refusal(request_or_iterator.message())
                    return request_or_iterator

                async def messages():
                    async for message in request_or_iterator:
                        if isinstance(message, Undecodable):
                            raise _Refusal(message.message())
                        yield message
                return messages()

            if streaming:
                async def stream(request, context):
                    try:
                        request = checked(request)
                    except _Refusal as refusal:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(refusal))
                    try:
                        async for response in behavior(request, context):
                            yield response
                    except _Refusal as refusal:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(refusal))
                return stream

            async def unary(request, context):
                try:
                    return await behavior(checked(request), context)
                except _Refusal as refusal:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(refusal))
            return unary

        return _replace_behavior(handler, wrap, deserializer=lambda old: _tolerant(old, limit))


class _Refusal(Exception):
    """Raised where an undecodable message is met (also inside a handler reading a request stream);
    DecodeInterceptor answers it with INVALID_ARGUMENT."""


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>`: UNAUTHENTICATED when missing, PERMISSION_DENIED when wrong (service/auth.py)."""

    def __init__(self, admin_tokens: tuple[str, ...], generation_tokens: tuple[str, ...]):
        self.required = {ADMIN_PREFIX: admin_tokens, GENERATION_PREFIX: generation_tokens}

    async def intercept_service(self, continuation, details):
        tokens = next((t for prefix, t in self.required.items() if details.method.startswith(prefix)), None)
        authorization = next((value for key, value in details.invocation_metadata or ()
                              if key.lower() == "authorization"), None)
        try:
            check_bearer(authorization, tokens or (), "'Bearer <token>' metadata")
            return await continuation(details)
        except LoraplexError as exc:
            code, message, trailing = status_code(exc), str(exc), field_metadata(exc)
        handler = await continuation(details)
        if handler is None:
            return None

        def wrap(behavior, streaming):
            if streaming:
                async def refuse_stream(request, context):
                    await context.abort(code, message, trailing)
                    yield  # never reached: makes this an async generator like the handler it replaces
                return refuse_stream

            async def refuse(request, context):
                await context.abort(code, message, trailing)
            return refuse

        return _replace_behavior(handler, wrap)
