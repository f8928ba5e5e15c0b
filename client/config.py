"""How a client reaches the server: target, token, TLS / mTLS, deadline, retries; and the channels built from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraplex.server.errors import ConfigError

MAX_RECEIVE_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff on UNAVAILABLE only (server starting, draining or unreachable): the call never
    ran, so trying again cannot do it twice. A stream is retried only before its first message."""

    max_attempts: int = 4
    """Tries in all; 1 = no retry."""
    initial_backoff: float = 0.2
    """Seconds before the first retry; each next wait is `multiplier` times longer, at most `max_backoff`."""
    multiplier: float = 2.0
    max_backoff: float = 5.0

    def __post_init__(self):
        if self.max_attempts < 1 or self.initial_backoff < 0 or self.multiplier < 1 or self.max_backoff < 0:
            raise ConfigError(f"retry policy: {self} (max_attempts >= 1, backoffs >= 0, multiplier >= 1)")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        return min(self.initial_backoff * self.multiplier ** retry, self.max_backoff)


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    target: str = "127.0.0.1:50051"
    token: str | None = field(default=None, repr=False)
    """Sent as `authorization: Bearer <token>`."""
    tls_ca: str | None = None
    """PEM roots to verify the server with; setting any tls_* field switches to TLS."""
    tls_cert: str | None = None
    """Client certificate (mTLS), with tls_key."""
    tls_key: str | None = None
    tls_server_name: str | None = None
    """Name to verify in the server's certificate, when it differs from the target's host."""
    timeout: float | None = None
    """Seconds per call (a gRPC deadline); None = none. Each call may pass its own."""
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together (--tls-cert and --tls-key)")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _secure(self) -> tuple[grpc.ChannelCredentials | None, list]:
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        if not (self.tls_ca or self.tls_cert or self.tls_server_name):
            return None, options
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return grpc.ssl_channel_credentials(_read(self.tls_ca), _read(self.tls_key), _read(self.tls_cert)), options

    def channel(self) -> grpc.Channel:
        credentials, options = self._secure()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, credentials, options=options)

    def aio_channel(self) -> grpc.aio.Channel:
        credentials, options = self._secure()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, credentials, options=options)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror})") from None
