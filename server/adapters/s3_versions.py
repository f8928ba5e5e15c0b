"""Adapter versions kept in an S3-compatible store for a shared registry (`--shared-adapter-dir s3://bucket/prefix`).

A replica that registers a version uploads its folder to `<prefix>/adapters/<name>/v<N>/`; a replica that needs a
version it does not hold downloads it into its own state dir (staged, then moved into place) and checks its sha256
against the record when it loads it, as for any kept copy. Objects are never overwritten: version numbers never
repeat. Reads go through s3_source.py (HEAD, then a GET conditional on the ETag), so the same errors and bounds apply.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from .remote import RemoteStores
from .s3_source import S3Source
from .sources import remove_tree, write_chunks


class S3VersionFiles:
    def __init__(self, url: str, stores: RemoteStores):
        self.url, self.stores = url.rstrip("/"), stores
        S3Source(self.url, stores)  # the bucket's name is checked now: a bad flag fails at start

    def _source(self, path: str) -> S3Source:
        return S3Source(f"{self.url}/{path}", self.stores)

    def publish(self, folder: Path, path: str) -> None:
        self._source(path).upload(folder)

    def fetch(self, path: str, folder: Path) -> None:
        staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
        staging.mkdir(parents=True)
        try:
            for name, remote in self._source(path).files().items():
                write_chunks(remote.chunks(), staging / name, remote.size, remote.shown)
            os.replace(staging, folder)
        finally:
            remove_tree(staging)
