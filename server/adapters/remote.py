"""Adapter sources that are not local folders: `hf://org/repo[@revision]` and `s3://bucket/prefix`.

A remote source is staged with the same bounds as a folder: both files' sizes are asked for first
(a missing one is NOT_FOUND), adapter_config.json (1 MiB at most) is fetched and read, the weights'
announced size is checked against the most a valid adapter with that config can be and the disk
against it, and only then are the weights streamed into staging; the stream is cut at the limit
whatever was announced, and stops as soon as the client goes away. The registry then validates the
staged copy like any other and records the source as resolved (a hub revision becomes its commit).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from ..errors import InvalidAdapter, InvalidArgument
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_CONFIG_BYTES
from .sources import write_chunks

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
NETWORK_CHUNK_BYTES = 64 << 10
"""Small enough that a client going away is noticed within one chunk even from a slow store."""


@dataclass(frozen=True, slots=True)
class RemoteStores:
    """Where remote sources are fetched from; None = the library's own default (its environment variables)."""

    hf_endpoint: str | None = None
    """Hub URL (huggingface_hub's HF_ENDPOINT when None)."""
    hf_cache_dir: str | None = None
    """huggingface_hub's cache, read before downloading and alone in offline mode (HF_HUB_CACHE when None)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (boto3's AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 when None, else AWS)."""
    s3_region: str | None = None
    """Region to sign for (AWS_DEFAULT_REGION / AWS_REGION when None, else us-east-1)."""


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file of a remote adapter: its size as announced, and its bytes on demand."""

    size: int
    shown: str
    """How messages name it, e.g. s3://bucket/prefix/adapter_model.safetensors."""
    chunks: Callable[[], Iterator[bytes]]


class RemoteSource(Protocol):
    shown: str
    """The source as the caller gave it (messages name it)."""

    def files(self) -> dict[str, RemoteFile]:
        """adapter_config.json and adapter_model.safetensors; AdapterNotFound naming the one that is missing."""

    @property
    def resolved(self) -> str:
        """The source as recorded, pinned where the store allows it (after files())."""


def is_remote(source: str) -> bool:
    return bool(SCHEME.match(source or ""))


def open_remote(source: str, stores: RemoteStores) -> RemoteSource:
    """The store a `scheme://` source names; INVALID_ARGUMENT (field source) for one we do not read."""
    scheme = SCHEME.match(source).group(1).lower()
    if len(source) > 1024 or any(ord(c) < 32 or c.isspace() for c in source):
        raise InvalidArgument("source: not a usable URL (over 1024 characters, whitespace or control characters)",
                              field="source")
    if scheme == "hf":
        from .hub_source import HubSource  # huggingface_hub: imported only when used

        return HubSource(source, stores)
    if scheme == "s3":
        from .s3_source import S3Source  # boto3: likewise

        return S3Source(source, stores)
    raise InvalidArgument(f"source: scheme {scheme!r} is not supported (give a folder inside the adapter roots, "
                          "hf://org/repo[@revision] or s3://bucket/prefix)", field="source")


def stage_remote(remote: RemoteSource, staging: Path, weights_limit: Callable[[Path], tuple[int, Exception | None]],
                 check_free: Callable[[int], None], should_stop: Callable[[], bool] | None) -> None:
    """Fetch a remote adapter into `staging`, bounded before and while the bytes arrive.

    `weights_limit(config_path)`: (most bytes the weights may have given the config, the error that
    explains a larger file better, or None). `check_free(n)`: raises if n more bytes would fill the disk."""
    files = remote.files()
    config, weights = files[ADAPTER_CONFIG], files[ADAPTER_WEIGHTS]
    if config.size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"source: {config.shown} has {config.size} bytes, more than an adapter config may have "
                             f"({MAX_CONFIG_BYTES}); nothing was copied", field="source")
    check_free(config.size)
    write_chunks(config.chunks(), staging / ADAPTER_CONFIG, MAX_CONFIG_BYTES, config.shown, should_stop)
    limit, oversize = weights_limit(staging / ADAPTER_CONFIG)
    if weights.size > limit:
        raise oversize or InvalidAdapter(
            f"source: {weights.shown} has {weights.size} bytes, more than a valid adapter with this "
            f"adapter_config.json can have on this server's base ({limit} bytes at most); nothing was copied",
            field="source")
    check_free(weights.size)
    copied = write_chunks(weights.chunks(), staging / ADAPTER_WEIGHTS, limit, weights.shown, should_stop)
    if copied != weights.size:
        raise InvalidAdapter(f"source: {weights.shown} announced {weights.size} bytes but sent {copied}; retry",
                             field="source")
