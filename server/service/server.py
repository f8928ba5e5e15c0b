"""The grpc.aio server: services, health, reflection, TLS, metrics, the OpenAI-compatible HTTP API beside
it (--http-port, same event loop and engine), and the drain on SIGTERM.

Lifecycle: `start()` listens at once with health NOT_SERVING; `load()` builds the engine (model,
KV cache) off the event loop, restores the registry and turns health SERVING; `stop()` turns
health NOT_SERVING, refuses new generations (UNAVAILABLE), lets running ones finish for the grace
period, cancels the rest, persists the registry and closes the listener.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

from ..adapters.registry import AdapterRegistry
from ..adapters.registry_store import LocalJsonStore, RegistryStore
from ..adapters.remote import RemoteStores
from ..adapters.source_rules import parse_rule
from ..config import EngineConfig, ServiceConfig
from ..engine.requests import max_request_bytes
from ..errors import ConfigError, Unavailable
from .admin import AdaptersServicer
from .first_use import FirstUseLoader
from .generations import Generations
from .interceptors import DecodeInterceptor, ErrorInterceptor, Scrubber, TokenAuthInterceptor
from .metrics import ServiceMetrics
from .runtime import Runtime
from .servicer import GenerationServicer
from .workers import WorkerPool

log = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADAPTERS_SERVICE = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name
_TEXT_METHODS = {f"/{GENERATION_SERVICE}/{name}" for name in ("Generate", "GenerateStream", "Tokenize")}
SWEEP_SECONDS = 0.5
"""How often the files of deleted or replaced adapter versions are looked at for removal."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror})") from None


def server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    ca = _read(config.tls_ca, "--tls-ca") if config.tls_ca else None
    return grpc.ssl_server_credentials([(_read(config.tls_key, "--tls-key"), _read(config.tls_cert, "--tls-cert"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def _listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `address` (TLS with credentials, else plaintext); a ConfigError naming it when that fails."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address} ({exc})") from None
    if not port:
        raise ConfigError(f"cannot listen on {address} (in use?)")
    return port


class LoraplexServer:
    def __init__(self, config: ServiceConfig, engine_config: EngineConfig, loaded=None):
        self.config, self.engine_config, self.loaded = config, engine_config, loaded
        metrics = ServiceMetrics(lambda: self.runtime.engine, config.max_adapter_labels) \
            if config.metrics_port is not None else None
        self.runtime = Runtime(config=config, metrics=metrics,
                               workers=WorkerPool(config.request_workers, config.max_pending_requests))
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.http_port: int | None = None
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self._http = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._flusher: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self.follower = None
        """RegistryFollower with a shared registry (--registry-url): other replicas' changes reach this engine."""

    async def start(self) -> None:
        """Listen (health NOT_SERVING until load() finishes)."""
        config = self.config
        server = grpc.aio.server(
            interceptors=[TokenAuthInterceptor(config.admin_tokens, config.generation_tokens),
                          ErrorInterceptor(_state_dir_scrubber(config)),
                          DecodeInterceptor(self._request_limit)],
            options=[("grpc.max_receive_message_length", config.max_message_bytes), ("grpc.so_reuseport", 0)])
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.runtime), server)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(self.runtime), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [GENERATION_SERVICE, ADAPTERS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = server_credentials(config)
        port = _listen(server, f"{config.host}:{config.port}", credentials)
        await server.start()
        self._server, self.port = server, port
        try:
            await self._start_side_listeners()
        except ConfigError:
            await self._stop_listeners()
            raise
        log.info("listening on %s:%d (%s), HTTP on %s, health-only on %s, metrics on %s", config.host, port,
                 "TLS" if credentials else "plaintext", self.http_port or "off", self.health_port or "off",
                 f"{config.metrics_host}:{self.metrics_port}" if self.metrics_port else "off")

    async def load(self) -> None:
        """Load the model and restore the registry off the event loop, then report SERVING."""
        from ..engine.engine import Engine

        engine = await asyncio.to_thread(Engine, self.engine_config, self.loaded)
        config = self.config
        stores = RemoteStores(hf_endpoint=config.hf_endpoint, hf_cache_dir=config.hf_cache_dir,
                              s3_endpoint_url=config.s3_endpoint_url, s3_region=config.s3_region)
        store = _registry_store(config, stores)
        registry = AdapterRegistry(engine, config.state_dir, list(config.adapter_roots), config.max_upload_bytes,
                                   min_free_disk_bytes=config.min_free_disk_bytes, strict_base=config.strict_base,
                                   stores=stores, store=store)
        try:
            await asyncio.to_thread(registry.restore)
        except Unavailable as exc:
            if not store.shared:
                engine.stop()
                raise
            log.warning("%s; starting with no adapters, they arrive when the database is back", exc)
        except BaseException:
            engine.stop()
            raise
        engine.start()
        if store.shared:
            from ..adapters.registry_follower import RegistryFollower

            self.follower = RegistryFollower(config.registry_url, registry.sync_name, registry.sync_all)
            self.follower.start()
        if config.adapter_sources:
            rules = tuple(parse_rule(text) for text in config.adapter_sources)
            self.runtime.first_use = FirstUseLoader(rules, registry, lambda: self.runtime.draining)
        self.runtime.engine, self.runtime.registry = engine, registry
        self._flusher = asyncio.create_task(self._flush_stats())
        self._sweeper = asyncio.create_task(self._sweep_retired())
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s with %d adapters", engine.loaded.model_id, len(engine.catalog.list()))

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, no new work, running work finishes within `grace` or is cancelled."""
        grace = self.config.grace_seconds if grace is None else grace
        self.runtime.draining = True  # new calls: UNAVAILABLE from here on
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        engine, registry = self.runtime.engine, self.runtime.registry
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        for task in (self._flusher, self._sweeper):
            if task is not None:
                task.cancel()
        if engine is not None:
            await asyncio.to_thread(engine.stop, grace)  # running requests finish, or are cancelled at `grace`
        await self._stop_listeners()
        if registry is not None:
            await asyncio.to_thread(registry.save)
            registry.close()
        if self.runtime.metrics is not None:
            self.runtime.metrics.close()
        self.runtime.workers.close()
        if self.runtime.first_use is not None:
            self.runtime.first_use.close()
        log.info("stopped")

    async def _start_side_listeners(self) -> None:
        """Plaintext health, HTTP API and metrics beside the gRPC port (each only when configured)."""
        config = self.config
        if config.health_port is not None:
            self._health_server, self.health_port = await self._start_health_listener()
        if config.http_port is not None:
            from ..openai_api.server import HttpServer  # FastAPI and uvicorn only when HTTP is asked for

            self._http = HttpServer(config, self.runtime, Generations(self.runtime))
            self.http_port = await self._http.start()
        if self.runtime.metrics is not None:
            try:
                self.metrics_port = self.runtime.metrics.serve(config.metrics_host, config.metrics_port)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port} "
                                  f"({exc.strerror})") from None

    async def _stop_listeners(self) -> None:
        """gRPC (handlers get a second for their last messages), health, HTTP: after the drain or a failed start."""
        if self._server is not None:
            await self._server.stop(1.0)
        if self._health_server is not None:
            await self._health_server.stop(None)
        if self._http is not None:
            await self._http.stop()

    async def _start_health_listener(self) -> tuple[grpc.aio.Server, int]:
        """The health service alone, plaintext, sharing this server's HealthServicer (so it turns NOT_SERVING
        with the drain): Kubernetes' gRPC probes cannot speak TLS."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = _listen(server, f"{self.config.host}:{self.config.health_port}", None)
        await server.start()
        return server, port

    async def _set_health(self, status) -> None:
        for service in ("", GENERATION_SERVICE, ADAPTERS_SERVICE):
            await self.health.set(service, status)

    async def _flush_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_flush_seconds)
            try:
                await asyncio.to_thread(self.runtime.registry.flush_stats)
            except OSError as exc:
                log.warning("could not write adapter stats: %s", exc)


    def _request_limit(self, method: str) -> int | None:
        """Generate / GenerateStream / Tokenize messages larger than any valid request are refused unparsed."""
        engine = self.runtime.engine
        if engine is None or method not in _TEXT_METHODS:
            return None
        return max_request_bytes(engine.limits)

    async def _sweep_retired(self) -> None:
        """Remove deleted / replaced adapter versions' files once the last request using them ends."""
        registry = self.runtime.registry
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            if registry.has_retired:
                try:
                    await asyncio.to_thread(registry.sweep_retired)
                except Exception:  # the engine stopping meanwhile, a busy disk: try again next round
                    log.exception("sweeping retired adapter versions failed")


def _registry_store(config: ServiceConfig, stores: RemoteStores) -> RegistryStore:
    """PostgreSQL + the shared folder (or S3 prefix) with --registry-url, else the state dir's registry.json."""
    if not config.registry_url:
        return LocalJsonStore(config.state_dir)
    from ..adapters.pg_store import PostgresStore  # psycopg only when a shared registry is asked for

    if config.shared_adapter_dir.startswith("s3://"):
        from ..adapters.s3_versions import S3VersionFiles

        return PostgresStore(config.registry_url, config.state_dir, S3VersionFiles(config.shared_adapter_dir, stores))
    return PostgresStore(config.registry_url, config.shared_adapter_dir)


def _state_dir_scrubber(config: ServiceConfig) -> Scrubber:
    """Client-bound messages show `<state dir>` (or `<shared dir>`) where the server's own folders would appear."""
    hidden = {}
    for folder, shown in ((config.shared_adapter_dir, "<shared dir>"), (config.state_dir, "<state dir>")):
        if folder and not folder.startswith("s3://"):
            hidden.update({folder: shown, str(Path(folder).absolute()): shown, str(Path(folder).resolve()): shown})
    return Scrubber(hidden)


async def serve(config: ServiceConfig, engine_config: EngineConfig, on_ready=None) -> None:
    """Run until SIGTERM / SIGINT, then drain and return (the CLI exits 0)."""
    server = LoraplexServer(config, engine_config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        await server.stop(0)
        raise loading.exception()
    if not stopping.done():
        if on_ready is not None:
            on_ready(server)
        await stopping
    else:
        loading.cancel()
    log.info("signal received: draining for up to %.0f s", config.grace_seconds)
    await server.stop()
