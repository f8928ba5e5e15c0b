"""The FastAPI app: `/v1/models`, `/v1/completions`, `/v1/chat/completions` over the shared engine.

Requests run through service/generations.py exactly as gRPC Generate does (same validation, worker
pool, metrics). Every route takes the Generation service's bearer tokens. Errors, including FastAPI's
own validation errors and unknown routes, answer with OpenAI's error body (errors.py). A stream's
headers go out once its first chunk is there, so a refused request still gets its HTTP status; an
error after that arrives as a last `data: {"error": ...}` event, as OpenAI's servers send it. A client
that disconnects cancels its request, which stops at the engine's next step and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import Cancelled, LoraplexError
from ..service.auth import check_bearer
from ..service.generations import Generations, RequestFactory
from ..service.routing import ROUTING_HEADER
from ..service.runtime import Runtime
from .errors import error_body, error_response, from_loraplex
from .limits import BodyLimit
from .requests import BASE_MODEL, ModelNames, chat_request, completion_request
from .responses import Rendering, sse
from .schemas import ChatCompletionBody, CompletionBody

log = logging.getLogger(__name__)
_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


class OpenAIRoutes:
    def __init__(self, runtime: Runtime, generations: Generations):
        self.runtime, self.generations = runtime, generations
        self.started = int(time.time())

    def authorize(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.runtime.config.generation_tokens,
                     "an 'Authorization: Bearer <token>' header")

    def _names(self) -> tuple[object, ModelNames]:
        engine = self.runtime.require_engine()
        return engine, ModelNames(engine.loaded.model_id, engine.catalog)

    async def list_models(self) -> dict:
        _, names = self._names()
        base = [self._base_card(BASE_MODEL, names), self._base_card(names.base_id, names)]
        return {"object": "list", "data": base + [self._adapter_card(e, names) for e in names.catalog.list()]}

    async def get_model(self, model: str) -> dict:
        _, names = self._names()
        adapter = names.adapter_for(model, mixed=False)
        return self._adapter_card(names.catalog.get(adapter), names) if adapter else self._base_card(model, names)

    def _base_card(self, model: str, names: ModelNames) -> dict:
        return {"id": model, "object": "model", "created": self.started, "owned_by": "loraplex",
                "root": names.base_id, "parent": None}

    @staticmethod
    def _adapter_card(entry, names: ModelNames) -> dict:
        """`version`, `rank`, `alpha`: extensions; `name@version` names this version in requests."""
        return {"id": entry.name, "object": "model", "created": int(entry.registered_at), "owned_by": "loraplex",
                "root": names.base_id, "parent": BASE_MODEL, "version": entry.version, "rank": entry.rank,
                "alpha": entry.alpha}

    async def completions(self, body: CompletionBody, request: Request):
        engine, names = self._names()
        rendering = Rendering.of(False, body.model or BASE_MODEL, engine.tokenizer, body.logprobs is not None,
                                 body.logprobs or 0)
        return await self._respond(lambda deadline: completion_request(body, names, deadline), rendering, body,
                                   request)

    async def chat_completions(self, body: ChatCompletionBody, request: Request):
        engine, names = self._names()
        rendering = Rendering.of(True, body.model or BASE_MODEL, engine.tokenizer, body.logprobs,
                                 body.top_logprobs or 0)
        return await self._respond(lambda deadline: chat_request(body, names, deadline), rendering, body, request)

    async def _respond(self, make_request: RequestFactory, rendering: Rendering, body, request: Request):
        """Until the response starts, a client that goes away cancels its request (as a gRPC cancel does);
        a stream is cancelled by Starlette when its client goes away."""
        stream = self.generations.run(make_request, None, request.headers.get(ROUTING_HEADER))
        if not body.stream:
            return JSONResponse(rendering.whole(await _unless_disconnected(request, _collect(stream))))
        try:
            first = await _unless_disconnected(request, anext(stream))
            if first.error is not None:
                raise first.error
        except BaseException:
            await stream.aclose()
            raise
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(self._events(first, stream, rendering, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    async def _events(chunk, stream, rendering: Rendering, usage: bool):
        sent, offset = 0, 0
        async with contextlib.aclosing(stream):
            while True:
                if chunk.error is not None:
                    error = chunk.error
                    if not isinstance(error, LoraplexError):
                        error = LoraplexError(f"internal error: {type(error).__name__}: {error}")
                    yield sse(from_loraplex(error, rendering.chat)[1])
                    return
                event = rendering.stream_chunk(chunk, first=sent == 0, offset=offset)
                if event is not None:
                    yield sse(event)
                    sent, offset = sent + 1, offset + len(chunk.text)
                if chunk.finished:
                    break
                chunk = await anext(stream)
        if usage:
            yield sse(rendering.usage_chunk(chunk))
        yield sse("[DONE]")


async def _collect(stream) -> list:
    chunks = []
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            if chunk.error is not None:
                raise chunk.error
            chunks.append(chunk)
    return chunks


async def _unless_disconnected(request: Request, work):
    """`work`'s result; when the client disconnects first, `work` is cancelled (its engine request with it)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Cancelled("the client went away")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(runtime: Runtime, generations: Generations) -> FastAPI:
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None)
    routes = OpenAIRoutes(runtime, generations)
    auth = [Depends(routes.authorize)]
    app.add_api_route("/v1/models", routes.list_models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/models/{model:path}", routes.get_model, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"], dependencies=auth)
    app.add_exception_handler(LoraplexError, _loraplex_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit, max_bytes=runtime.config.max_message_bytes)
    return app


async def _loraplex_error(request: Request, exc: LoraplexError) -> JSONResponse:
    status, body = from_loraplex(exc, chat=request.url.path.endswith("/chat/completions"))
    return error_response(status, body, {"WWW-Authenticate": "Bearer"} if status == 401 else None)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 -> 400 naming the first bad field, e.g. `messages[0].content`."""
    first = exc.errors()[0]
    param = _param(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        message, param = f"body: not valid JSON ({first.get('msg', '')})", None
    elif kind == "extra_forbidden":
        message = f"{param}: unknown field"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
    return error_response(400, error_body(message, "INVALID_ARGUMENT", param, "invalid_value"))


def _param(loc) -> str | None:
    """pydantic's error location (`body`, `messages`, 0, `content`, `str`) -> `messages[0].content`."""
    param = ""
    for part in list(loc)[1:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in part or "-" in part or part.lower() in _TYPE_TAGS:  # a union member's tag, not a field
            break
        else:
            param += f".{part}" if param else part
    return param or None


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    code = "NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT"
    body = error_body(message, code, None, "not_found" if exc.status_code == 404 else "invalid_request")
    return error_response(exc.status_code, body)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed with an unexpected error", request.method, request.url.path, exc_info=exc)
    return error_response(500, error_body(f"internal error: {type(exc).__name__}: {exc}", "INTERNAL"))
