"""gRPC failures as exceptions that carry the status, the message and the request field they are about."""
from __future__ import annotations

import grpc

from loraplex.server.service.interceptors import FIELD_METADATA


class LoraplexClientError(Exception):
    """A call the server refused or could not run. `status` is the grpc.StatusCode, `field` the request
    field it names (None when the error is not about one field)."""

    def __init__(self, status: grpc.StatusCode, message: str, field: str | None = None):
        super().__init__(f"{status.name}: {message}")
        self.status, self.message, self.field = status, message, field

    @property
    def retryable(self) -> bool:
        return self.status is grpc.StatusCode.UNAVAILABLE


class InvalidArgument(LoraplexClientError):
    pass


class NotFound(LoraplexClientError):
    pass


class AlreadyExists(LoraplexClientError):
    pass


class FailedPrecondition(LoraplexClientError):
    pass


class Unauthenticated(LoraplexClientError):
    pass


class PermissionDenied(LoraplexClientError):
    pass


class ResourceExhausted(LoraplexClientError):
    """Queue full or server busy: retry later (not retried automatically)."""


class Unavailable(LoraplexClientError):
    """Starting, draining, or unreachable: retried with backoff by the client's RetryPolicy."""


class DeadlineExceeded(LoraplexClientError):
    pass


_CLASSES = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
            grpc.StatusCode.ALREADY_EXISTS: AlreadyExists, grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
            grpc.StatusCode.UNAUTHENTICATED: Unauthenticated, grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
            grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted, grpc.StatusCode.UNAVAILABLE: Unavailable,
            grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded}


def from_rpc_error(error: grpc.RpcError) -> LoraplexClientError:
    """The typed exception for a failed call (sync or grpc.aio)."""
    status = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    field = next((value for key, value in trailing or () if key == FIELD_METADATA), None)
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    return _CLASSES.get(status, LoraplexClientError)(status, message, field)
