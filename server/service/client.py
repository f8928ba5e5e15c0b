"""A small synchronous client over the generated stubs (the CLI and the demo use it)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

from ..adapters.sources import ADAPTER_FILES
from ..errors import ConfigError

UPLOAD_CHUNK_BYTES = 1 << 20


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
    """Seconds per call (a gRPC deadline); None = none."""


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror})") from None


def open_channel(config: ClientConfig) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 16 << 20)]
    if not (config.tls_ca or config.tls_cert or config.tls_server_name):
        return grpc.insecure_channel(config.target, options=options)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(_read(config.tls_ca), _read(config.tls_key), _read(config.tls_cert))
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return grpc.secure_channel(config.target, credentials, options=options)


class Client:
    def __init__(self, config: ClientConfig):
        self.config = config
        self.channel = open_channel(config)
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.channel.close()

    def call(self, method, request, **kwargs):
        return method(request, metadata=self.metadata, timeout=self.config.timeout, **kwargs)

    def wait_serving(self, timeout: float, alive=lambda: True) -> None:
        """Until health says SERVING; TimeoutError after `timeout` s, RuntimeError once `alive()` is False."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive():
                raise RuntimeError("the server exited before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.config.target} was not SERVING within {timeout:.0f} s")
            time.sleep(0.2)

    def upload(self, name: str, folder: str | Path, pin: bool = False, preload: bool = False):
        """UploadAdapter with the folder's adapter files, in chunks."""
        folder = Path(folder)
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{folder}: missing {', '.join(missing)} (a PEFT adapter folder has both)")

        def messages():
            yield adapters_pb2.UploadAdapterRequest(name=name, pin=pin, preload=preload)
            for file_name in ADAPTER_FILES:
                with open(folder / file_name, "rb") as handle:
                    while chunk := handle.read(UPLOAD_CHUNK_BYTES):
                        yield adapters_pb2.UploadAdapterRequest(file_name=file_name, data=chunk)
        return self.call(self.adapters.UploadAdapter, messages()).adapter


def chat_request(text: str, **kwargs) -> generation_pb2.GenerateRequest:
    """A GenerateRequest whose input is one user message."""
    return generation_pb2.GenerateRequest(
        messages=generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(role="user", content=text)]),
        **kwargs)
