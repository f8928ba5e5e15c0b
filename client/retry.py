"""One call's attempts: which failures are retried (UNAVAILABLE only), the backoff, and the deadline left."""
from __future__ import annotations

import time

import grpc

from .config import RetryPolicy
from .errors import from_rpc_error


class Attempts:
    def __init__(self, policy: RetryPolicy, timeout: float | None):
        self.policy = policy
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.retries = 0

    def remaining(self) -> float | None:
        """Seconds left of the call's deadline (shared by all its attempts); None = no deadline."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

    def pause_or_raise(self, error: grpc.RpcError, received: bool = False) -> float:
        """Seconds to wait before trying again after `error`; raises it, typed, when it is not retried
        (another status, attempts or deadline used up, or a stream that has already `received` messages)."""
        code = error.code() if hasattr(error, "code") else None
        wait = self.policy.backoff(self.retries)
        if (received or code is not grpc.StatusCode.UNAVAILABLE or self.retries + 1 >= self.policy.max_attempts
                or self.deadline is not None and time.monotonic() + wait >= self.deadline):
            raise from_rpc_error(error) from None
        self.retries += 1
        return wait
