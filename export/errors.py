"""Export errors, each with the CLI exit code it maps to (server errors such as InvalidAdapter exit 2)."""
from __future__ import annotations

from loraplex.server.errors import LoraplexError

EXIT_OK = 0
EXIT_INTERNAL = 1
"""A bug: anything that is not a LoraplexError (printed with its traceback)."""
EXIT_USAGE = 2
"""Bad input: a missing or invalid adapter, base, manifest or output path."""
EXIT_TENSORRT_MISSING = 3
"""`tensorrt` does not import: the trtexec command was written instead."""
EXIT_VALIDATION = 4
"""An export ran but onnxruntime disagreed with PyTorch beyond tolerance (kept aside as <out>.invalid)."""
EXIT_BATCH_FAILURES = 5
"""`export batch` finished, but at least one item failed (see results.json)."""


class ExportError(LoraplexError):
    """A bad export request or output path; the message says which and why."""

    code = "INVALID_ARGUMENT"
    exit_code = EXIT_USAGE


class TensorRTUnavailable(ExportError):
    """`import tensorrt` failed; the message names the trtexec command file written instead."""

    code = "UNIMPLEMENTED"
    exit_code = EXIT_TENSORRT_MISSING


class ValidationFailed(ExportError):
    """onnxruntime's results differ from PyTorch's beyond tolerance."""

    code = "INTERNAL"
    exit_code = EXIT_VALIDATION


def exit_code_of(exc: LoraplexError) -> int:
    return getattr(exc, "exit_code", EXIT_USAGE)
