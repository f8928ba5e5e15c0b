"""uvicorn inside the gRPC server's event loop, serving the OpenAI-compatible app on `--host:--http-port`.

The socket is bound here (so port 0 works and a busy port is a ConfigError, not uvicorn's exit);
loraplex owns the signals and the drain: uvicorn installs no handlers, keeps answering (503) while the
engine drains, and is stopped after it. TLS and mTLS use the gRPC server's certificate settings.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import uvicorn

from ..config import ServiceConfig
from ..errors import ConfigError
from ..service.generations import Generations
from ..service.runtime import Runtime
from .app import build_app

STARTUP_SECONDS = 30.0
SHUTDOWN_SECONDS = 5.0
"""After the engine has drained, how long open HTTP connections get to send their last bytes."""


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """No handlers: SIGTERM is the gRPC server's, which drains and then stops this one."""
        yield


class HttpServer:
    def __init__(self, config: ServiceConfig, runtime: Runtime, generations: Generations):
        self.config = config
        self.app = build_app(runtime, generations)
        self.port: int | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
        config = self.config
        try:
            sock = socket.create_server((config.host, config.http_port), reuse_port=False)
        except OSError as exc:
            raise ConfigError(f"cannot serve HTTP on {config.host}:{config.http_port} ({exc.strerror})") from None
        tls = dict(ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key, ssl_ca_certs=config.tls_ca,
                   ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_ca else ssl.CERT_NONE) if config.tls_cert else {}
        server = _EmbeddedServer(uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False,
                                                timeout_graceful_shutdown=SHUTDOWN_SECONDS, **tls))
        self._server, self.port = server, sock.getsockname()[1]
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        deadline = asyncio.get_running_loop().time() + STARTUP_SECONDS
        while not server.started:
            if self._task.done():
                sock.close()
                raise ConfigError(f"the HTTP server on {config.host}:{self.port} did not start "
                                  f"({self._task.exception()!r})")
            if asyncio.get_running_loop().time() > deadline:
                raise ConfigError(f"the HTTP server on {config.host}:{self.port} did not start in time")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        await self._task
