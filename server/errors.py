"""Client-visible errors, one class per case, each carrying its gRPC status code name.

The engine and the adapter code raise these; the service layer maps `code` to a
grpc.StatusCode by name, so this module never imports grpc. Anything else that
escapes is a bug and becomes INTERNAL.
"""
from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error a client may see; `code` names a grpc.StatusCode."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidArgument(LoraplexError):
    """Bad request parameter; the message names the field."""

    code = "INVALID_ARGUMENT"


class AdapterNotFound(LoraplexError):
    code = "NOT_FOUND"


class AlreadyExists(LoraplexError):
    code = "ALREADY_EXISTS"


class InvalidAdapter(LoraplexError):
    """The adapter's files are unusable (format, values, features we refuse)."""

    code = "INVALID_ARGUMENT"


class AdapterMismatch(LoraplexError):
    """The adapter does not fit this base model (architecture, shapes, targets, rank)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(LoraplexError):
    """Queue full, or not enough KV blocks / adapter slots ever to run a request."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(LoraplexError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(LoraplexError):
    code = "CANCELLED"


class Unavailable(LoraplexError):
    """The engine is stopped or draining."""

    code = "UNAVAILABLE"


class Unimplemented(LoraplexError):
    code = "UNIMPLEMENTED"


class FailedPrecondition(LoraplexError):
    """The request is valid but the server's state refuses it (e.g. unloading a pinned adapter)."""

    code = "FAILED_PRECONDITION"


class Unauthenticated(LoraplexError):
    """No bearer token where one is required."""

    code = "UNAUTHENTICATED"


class PermissionDenied(LoraplexError):
    """A bearer token that is not the right one."""

    code = "PERMISSION_DENIED"


class ConfigError(LoraplexError):
    """A configuration value is wrong; the message lists every problem found."""

    code = "INVALID_ARGUMENT"


class ModelLoadError(LoraplexError):
    """The base model folder or file cannot be used."""

    code = "FAILED_PRECONDITION"
