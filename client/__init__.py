"""loraplex's typed Python client over gRPC: `Client` (blocking) and `AsyncClient` (asyncio).

    from loraplex.client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate(messages=[{"role": "user", "content": "Hi"}], adapter="caps").text)

Results are dataclasses (GenerationResult, GenerationChunk, Tokens, ModelInfo, AdapterInfo); a refused
call raises a LoraplexClientError subclass carrying the gRPC `status`, the `message` and the request
`field` it names. UNAVAILABLE is retried with exponential backoff (RetryPolicy); nothing else is.
"""
from loraplex.server.types import GenerationChunk, GenerationResult, StopReason, TokenLogprob

from .aio import AsyncClient
from .api import Stubs
from .config import NO_RETRY, ClientConfig, RetryPolicy
from .errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, LoraplexClientError,
                     NotFound, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable)
from .results import AdapterInfo, ModelInfo, Tokens
from .sync import Client

__all__ = ["AdapterInfo", "AlreadyExists", "AsyncClient", "Client", "ClientConfig", "DeadlineExceeded",
           "FailedPrecondition", "GenerationChunk", "GenerationResult", "InvalidArgument", "LoraplexClientError",
           "ModelInfo", "NO_RETRY", "NotFound", "PermissionDenied", "ResourceExhausted", "RetryPolicy", "StopReason",
           "Stubs", "TokenLogprob", "Tokens", "Unauthenticated", "Unavailable"]
