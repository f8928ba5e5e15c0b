"""loraplex errors -> OpenAI error bodies `{"error": {"message", "type", "param", "code"}}` and HTTP codes.

Each error's gRPC status code name (server/errors.py) picks the HTTP status and OpenAI `type`; the
field it names is translated to the OpenAI field the client sent (`sampling.temperature` ->
`temperature`), in `param` and in the message.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import LoraplexError

_STATUS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "FAILED_PRECONDITION": (400, "invalid_request_error"),
           "OUT_OF_RANGE": (400, "invalid_request_error"), "UNAUTHENTICATED": (401, "authentication_error"),
           "PERMISSION_DENIED": (403, "permission_error"), "NOT_FOUND": (404, "not_found_error"),
           "ALREADY_EXISTS": (409, "invalid_request_error"), "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
           "CANCELLED": (499, "cancelled"), "UNIMPLEMENTED": (501, "server_error"),
           "UNAVAILABLE": (503, "service_unavailable_error"), "DEADLINE_EXCEEDED": (504, "timeout_error")}
_PARAMS = {"sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
           "sampling.repetition_penalty": "repetition_penalty", "sampling.seed": "seed",
           "stopping.max_new_tokens": "max_tokens", "stopping.stop_sequences": "stop", "top_logprobs": "logprobs",
           "adapter": "model", "input": "prompt"}
_CHAT_PARAMS = {"top_logprobs": "top_logprobs", "prompt": "messages", "input": "messages"}


def http_status(code: str) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of a gRPC status code name."""
    return _STATUS.get(code, (500, "server_error"))


def openai_param(field: str | None, chat: bool = False) -> str | None:
    """The OpenAI request field for one of loraplex's field names (unchanged when they agree)."""
    if field is None:
        return None
    return (_CHAT_PARAMS.get(field) if chat else None) or _PARAMS.get(field, field)


def error_body(message: str, code: str, param: str | None = None, error_code: str | None = None) -> dict:
    _, kind = http_status(code)
    return {"error": {"message": message, "type": kind, "param": param, "code": error_code or code.lower()}}


def from_loraplex(exc: LoraplexError, chat: bool = False) -> tuple[int, dict]:
    """(HTTP status, body) of a loraplex error, its field renamed to the OpenAI one."""
    param = openai_param(exc.field, chat)
    message = str(exc)
    if exc.field and param != exc.field and message.startswith(exc.field):
        message = param + message[len(exc.field):]
    error_code = "model_not_found" if exc.code == "NOT_FOUND" and param in ("model", "adapters") else None
    return http_status(exc.code)[0], error_body(message, exc.code, param, error_code)


def error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)
