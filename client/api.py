"""The typed calls, written once for both transports: `Client` runs each as a blocking call, `AsyncClient`
returns a coroutine (or an async iterator for `stream`). A transport provides `stubs`, `_unary`,
`_server_stream` and `_client_stream`; every call takes `timeout` (seconds, else the config's)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.server.adapters.sources import ADAPTER_FILES
from loraplex.server.errors import ConfigError
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraplex.v1 import generation_pb2 as gpb

from . import convert

UPLOAD_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Stubs:
    """The generated stubs on the client's channel, for raw protobuf calls (see `Client.call`)."""

    generation: generation_pb2_grpc.GenerationStub
    adapters: adapters_pb2_grpc.AdaptersStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def of(cls, channel) -> "Stubs":
        return cls(generation_pb2_grpc.GenerationStub(channel), adapters_pb2_grpc.AdaptersStub(channel),
                   health_pb2_grpc.HealthStub(channel))


class Methods:
    stubs: Stubs

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **options):
        """One completion (GenerationResult). `prompt` is raw text; or `messages=[{"role", "content"}]` for the
        chat template. Options: adapter, adapters ({name: weight}), merge_method, density, temperature, top_p,
        top_k, repetition_penalty, seed, max_new_tokens, stop, ignore_eos, top_logprobs, request_id."""
        return self._unary(self.stubs.generation.Generate, convert.generate_request(prompt, **options),
                           convert.result, timeout)

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **options):
        """GenerationChunks as they are generated (text deltas; the last one carries stop_reason)."""
        return self._server_stream(self.stubs.generation.GenerateStream, convert.generate_request(prompt, **options),
                                   convert.chunk, timeout)

    def tokenize(self, text: str | None = None, *, messages=None, return_tokens: bool = False,
                 timeout: float | None = None):
        """Token ids (Tokens) of a text, or of chat messages after the chat template."""
        return self._unary(self.stubs.generation.Tokenize,
                           convert.tokenize_request(text, messages=messages, return_tokens=return_tokens),
                           convert.tokens, timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health service's status name for `service` ("" = the whole server): SERVING, NOT_SERVING, ..."""
        return self._unary(self.stubs.health.Check, health_pb2.HealthCheckRequest(service=service),
                           lambda reply: health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), timeout)

    def model_info(self, *, timeout: float | None = None):
        return self._unary(self.stubs.generation.ModelInfo, gpb.ModelInfoRequest(), convert.model_info, timeout)

    def list_adapters(self, *, timeout: float | None = None):
        return self._unary(self.stubs.adapters.ListAdapters, apb.ListAdaptersRequest(), convert.adapters, timeout)

    def register_adapter(self, name: str, source: str, *, pin: bool = False, preload: bool = False,
                         timeout: float | None = None):
        """From `source`, a PEFT folder on the server's disk inside one of its --adapter-root folders."""
        request = apb.RegisterAdapterRequest(name=name, source=source, pin=pin, preload=preload)
        return self._unary(self.stubs.adapters.RegisterAdapter, request, convert.adapter, timeout)

    def upload_adapter(self, name: str, folder: str | Path, *, pin: bool = False, preload: bool = False,
                       timeout: float | None = None):
        """Send a local PEFT folder's two files (UploadAdapter, in 1 MiB chunks)."""
        folder = Path(folder)
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{folder}: missing {', '.join(missing)} (a PEFT adapter folder has both)")

        def messages():
            files = ((name, _chunks(folder / name)) for name in ADAPTER_FILES)
            return convert.upload_messages(name, files, pin, preload)
        return self._client_stream(self.stubs.adapters.UploadAdapter, messages, convert.adapter, timeout)

    def get_adapter(self, name: str, *, timeout: float | None = None):
        return self._unary(self.stubs.adapters.GetAdapter, apb.GetAdapterRequest(name=name), convert.adapter, timeout)

    def delete_adapter(self, name: str, *, timeout: float | None = None):
        """Unregister; requests already running with it finish."""
        return self._unary(self.stubs.adapters.DeleteAdapter, apb.DeleteAdapterRequest(name=name), convert.adapter,
                           timeout)

    def load_adapter(self, name: str, *, timeout: float | None = None):
        return self._unary(self.stubs.adapters.LoadAdapter, apb.LoadAdapterRequest(name=name), convert.adapter,
                           timeout)

    def unload_adapter(self, name: str, *, timeout: float | None = None):
        return self._unary(self.stubs.adapters.UnloadAdapter, apb.UnloadAdapterRequest(name=name), convert.adapter,
                           timeout)

    def pin_adapter(self, name: str, *, timeout: float | None = None):
        return self._unary(self.stubs.adapters.PinAdapter, apb.PinAdapterRequest(name=name), convert.adapter, timeout)

    def unpin_adapter(self, name: str, *, timeout: float | None = None):
        return self._unary(self.stubs.adapters.UnpinAdapter, apb.UnpinAdapterRequest(name=name), convert.adapter,
                           timeout)

    def _unary(self, method, request, result, timeout):
        raise NotImplementedError

    def _server_stream(self, method, request, result, timeout):
        raise NotImplementedError

    def _client_stream(self, method, requests, result, timeout):
        raise NotImplementedError


def _chunks(path: Path):
    with open(path, "rb") as handle:
        while data := handle.read(UPLOAD_CHUNK_BYTES):
            yield data
