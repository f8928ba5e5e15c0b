"""Server interceptors: bearer-token auth per service, and loraplex errors -> gRPC status codes.

Errors carry the name of their grpc.StatusCode in `.code` (server/errors.py); anything else that
escapes a handler is a bug: logged with its traceback and sent as INTERNAL. Health and reflection
are never behind a token (load balancers and `grpcurl list` must reach them).
"""
from __future__ import annotations

import hmac
import logging

import grpc

from ..errors import LoraplexError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "/loraplex.v1."
ADMIN_PREFIX = "/loraplex.v1.Adapters/"
GENERATION_PREFIX = "/loraplex.v1.Generation/"


def status_code(exc: LoraplexError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


def _replace_behavior(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    """The same method handler with its behaviour passed through `wrap(behavior, streaming_response)`."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
             ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
             ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
             ("stream_stream", grpc.stream_stream_rpc_method_handler, True))
    for attribute, make, streaming in kinds:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return make(wrap(behavior, streaming), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


async def _abort_for(exc: Exception, context, method: str):
    if isinstance(exc, LoraplexError):
        await context.abort(status_code(exc), str(exc))
    log.error("%s failed with an unexpected error", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps LoraplexError to its status code and anything else to INTERNAL, for loraplex's services."""

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
                        await _abort_for(exc, context, method)
                return stream

            async def unary(request, context):
                try:
                    return await behavior(request, context)
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as exc:
                    await _abort_for(exc, context, method)
            return unary

        return _replace_behavior(handler, wrap)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>`: UNAUTHENTICATED when missing, PERMISSION_DENIED when wrong."""

    def __init__(self, admin_tokens: tuple[str, ...], generation_tokens: tuple[str, ...]):
        self.required = {ADMIN_PREFIX: [t.encode() for t in admin_tokens],
                         GENERATION_PREFIX: [t.encode() for t in generation_tokens]}

    async def intercept_service(self, continuation, details):
        tokens = next((t for prefix, t in self.required.items() if details.method.startswith(prefix)), None)
        if not tokens:
            return await continuation(details)
        presented = _bearer(details.invocation_metadata)
        if presented is None:
            code, message = grpc.StatusCode.UNAUTHENTICATED, "authorization: this call needs 'Bearer <token>' metadata"
        elif not _matches(presented.encode(), tokens):
            code, message = grpc.StatusCode.PERMISSION_DENIED, "authorization: the bearer token is not accepted here"
        else:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None

        def wrap(behavior, streaming):
            if streaming:
                async def refuse_stream(request, context):
                    await context.abort(code, message)
                    yield  # never reached: makes this an async generator like the handler it replaces
                return refuse_stream

            async def refuse(request, context):
                await context.abort(code, message)
            return refuse

        return _replace_behavior(handler, wrap)


def _bearer(metadata) -> str | None:
    """The bearer token presented, or None when there is none (no header, another scheme, empty)."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _matches(presented: bytes, tokens: list[bytes]) -> bool:
    """Constant-time against every accepted token (no early exit, so timing shows nothing)."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented, token)
    return matched
