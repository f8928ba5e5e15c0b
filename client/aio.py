"""`AsyncClient`: the typed calls (api.py) over grpc.aio: `await client.generate(...)`,
`async for chunk in client.stream(...)`; retries on UNAVAILABLE as the blocking Client does."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2

from . import convert
from .api import Methods, Stubs
from .config import ClientConfig
from .retry import Attempts


class AsyncClient(Methods):
    """`AsyncClient("127.0.0.1:50051", token=...)`, or `AsyncClient(ClientConfig(...))`; create it inside the
    event loop that uses it."""

    def __init__(self, target: str | ClientConfig = "127.0.0.1:50051", **options):
        self.config = target if isinstance(target, ClientConfig) else ClientConfig(target=target, **options)
        self.channel = self.config.aio_channel()
        self.stubs = Stubs.of(self.channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def call(self, method, request, timeout: float | None = None, **kwargs):
        """A raw stub call with this client's token and deadline (await it, or iterate a stream)."""
        return method(request, metadata=self.config.metadata + convert.routing_metadata(request),
                      timeout=timeout or self.config.timeout, **kwargs)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until health says SERVING; TimeoutError after `timeout` s."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reply = await self.stubs.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{self.config.target} was not SERVING within {timeout:.0f} s")
            await asyncio.sleep(0.2)

    async def _unary(self, method, request, result, timeout):
        return result(await self._retrying(lambda remaining: self.call(method, request, remaining), timeout))

    async def _client_stream(self, method, requests, result, timeout):
        return result(await self._retrying(lambda remaining: self.call(method, requests(), remaining), timeout))

    async def _retrying(self, attempt, timeout):
        attempts = Attempts(self.config.retry, timeout or self.config.timeout)
        while True:
            try:
                return await attempt(attempts.remaining())
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.pause_or_raise(error))

    async def _server_stream(self, method, request, result, timeout):
        attempts = Attempts(self.config.retry, timeout or self.config.timeout)
        received = False
        while True:
            call = self.call(method, request, attempts.remaining())
            try:
                async for response in call:
                    received = True
                    yield result(response)
                return
            except grpc.RpcError as error:
                pause = attempts.pause_or_raise(error, received)
            finally:
                call.cancel()
            await asyncio.sleep(pause)
