"""`hf://org/repo[@revision]`: an adapter on a Hugging Face hub (or the mirror at --hf-endpoint).

Through huggingface_hub's public API: a HEAD per file (its size and the commit the revision points
at; the second file is asked for at that commit, so both come from one commit), a file already in
huggingface_hub's cache at that commit is read from there, anything else is streamed from the hub
with the library's session and headers (HF_TOKEN). In offline mode (HF_HUB_OFFLINE) only the cache
is read. The recorded source names the commit, e.g. hf://org/repo@0123abcd...
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import httpx2
from huggingface_hub import constants, get_hf_file_metadata, get_session, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, validate_repo_id

from ..errors import AdapterNotFound, FailedPrecondition, InvalidAdapter, InvalidArgument, Unavailable
from .remote import NETWORK_CHUNK_BYTES, RemoteFile, RemoteStores
from .sources import ADAPTER_FILES, file_chunks

TIMEOUT_SECONDS = 30.0


class HubSource:
    def __init__(self, source: str, stores: RemoteStores):
        self.shown = source
        repo, at, revision = source[len("hf://"):].partition("@")
        try:
            validate_repo_id(repo)
        except HFValidationError as exc:
            raise InvalidArgument(f"source: {source!r} does not name a hub repository as hf://org/repo[@revision] "
                                  f"({exc})", field="source") from None
        if at and not revision:
            raise InvalidArgument(f"source: {source!r} has an empty revision after '@'", field="source")
        self.repo, self.revision = repo, revision or "main"
        self.endpoint = (stores.hf_endpoint or constants.ENDPOINT).rstrip("/")
        self.cache_dir = stores.hf_cache_dir
        self.commit: str | None = None

    @property
    def resolved(self) -> str:
        return f"hf://{self.repo}@{self.commit or self.revision}"

    def files(self) -> dict[str, RemoteFile]:
        with self._errors():
            if constants.is_offline_mode():
                return {name: self._cached(name) for name in ADAPTER_FILES}
            return {name: self._online(name) for name in ADAPTER_FILES}

    def _online(self, name: str) -> RemoteFile:
        url = hf_hub_url(self.repo, name, revision=self.commit or self.revision, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, timeout=TIMEOUT_SECONDS, endpoint=self.endpoint)
        self.commit = self.commit or meta.commit_hash
        cached = try_to_load_from_cache(self.repo, name, cache_dir=self.cache_dir, revision=self.commit) \
            if self.commit else None
        if isinstance(cached, str):
            return _local_file(cached, f"{self.shown}/{name}")
        if meta.size is None:
            raise InvalidAdapter(f"source: the hub did not announce the size of {self.shown}/{name}; nothing was "
                                 "copied", field="source")
        return RemoteFile(meta.size, f"{self.shown}/{name}", lambda: self._stream(meta.location))

    def _cached(self, name: str) -> RemoteFile:
        path = try_to_load_from_cache(self.repo, name, cache_dir=self.cache_dir, revision=self.commit or self.revision)
        if not isinstance(path, str):
            raise FailedPrecondition(f"source: {self.shown}/{name} is not in the hub cache and huggingface_hub is "
                                     "offline (HF_HUB_OFFLINE); download it into the cache or go online",
                                     field="source")
        self.commit = Path(path).parent.name  # <cache>/models--org--repo/snapshots/<commit>/<file>
        return _local_file(path, f"{self.shown}/{name}")

    def _stream(self, url: str) -> Iterator[bytes]:
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"  # the announced size is the size of the bytes sent
        with self._errors(), get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                                  timeout=TIMEOUT_SECONDS) as response:
            hf_raise_for_status(response)
            yield from response.iter_bytes(NETWORK_CHUNK_BYTES)

    @contextlib.contextmanager
    def _errors(self):
        """The hub's errors as client statuses naming the source."""
        try:
            yield
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            what = {RepositoryNotFoundError: "repository", RevisionNotFoundError: "revision"}.get(type(exc), "file")
            raise AdapterNotFound(f"source: {self.shown}: the hub has no such {what} (or it is private and this "
                                  "server's token may not read it)", field="source") from None
        except OfflineModeIsEnabled:
            raise FailedPrecondition(f"source: {self.shown}: huggingface_hub is offline (HF_HUB_OFFLINE)",
                                     field="source") from None
        except (HfHubHTTPError, httpx2.HTTPError) as exc:
            raise Unavailable(f"source: {self.shown}: the hub at {self.endpoint} could not be read "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); retry",
                              field="source") from None


def _local_file(path: str, shown: str) -> RemoteFile:
    return RemoteFile(os.stat(path).st_size, shown, lambda: file_chunks(Path(path)))
