"""`Client`: the typed calls (api.py) as blocking gRPC calls, with retries on UNAVAILABLE (config.RetryPolicy)."""
from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2

from . import convert
from .api import Methods, Stubs
from .config import ClientConfig
from .retry import Attempts


class Client(Methods):
    """`Client("127.0.0.1:50051", token=..., timeout=...)`, or `Client(ClientConfig(...))`."""

    def __init__(self, target: str | ClientConfig = "127.0.0.1:50051", **options):
        self.config = target if isinstance(target, ClientConfig) else ClientConfig(target=target, **options)
        self.channel = self.config.channel()
        self.stubs = Stubs.of(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, method, request, timeout: float | None = None, **kwargs):
        """A raw stub call (`client.call(client.stubs.generation.Generate, message)`) with this client's token
        and deadline; no retry, and grpc.RpcError as grpc raises it."""
        return method(request, metadata=self.config.metadata + convert.routing_metadata(request),
                      timeout=timeout or self.config.timeout, **kwargs)

    def wait_ready(self, timeout: float = 60.0, alive=lambda: True) -> None:
        """Until health says SERVING; TimeoutError after `timeout` s, RuntimeError once `alive()` is False."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self.stubs.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive():
                raise RuntimeError("the server exited before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.config.target} was not SERVING within {timeout:.0f} s")
            time.sleep(0.2)

    def _unary(self, method, request, result, timeout):
        return result(self._retrying(lambda remaining: self.call(method, request, remaining), timeout))

    def _client_stream(self, method, requests, result, timeout):
        return result(self._retrying(lambda remaining: self.call(method, requests(), remaining), timeout))

    def _retrying(self, attempt, timeout):
        attempts = Attempts(self.config.retry, timeout or self.config.timeout)
        while True:
            try:
                return attempt(attempts.remaining())
            except grpc.RpcError as error:
                time.sleep(attempts.pause_or_raise(error))

    def _server_stream(self, method, request, result, timeout):
        attempts = Attempts(self.config.retry, timeout or self.config.timeout)
        received = False
        while True:
            call = self.call(method, request, attempts.remaining())
            try:
                for response in call:
                    received = True
                    yield result(response)
                return
            except grpc.RpcError as error:
                pause = attempts.pause_or_raise(error, received)
            finally:
                call.cancel()  # the caller stopped reading early: the server stops generating
            time.sleep(pause)
