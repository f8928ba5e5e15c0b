"""`s3://bucket/prefix`: an adapter in an S3-compatible store, through boto3.

The endpoint, region and credentials come from boto3's usual places (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles) unless `--s3-endpoint-url` /
`--s3-region` say otherwise. Each file is asked for with a HEAD (size, ETag) and read with a GET
conditional on that ETag, so an object replaced in between is refused rather than mixed.
"""
from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ..errors import AdapterNotFound, FailedPrecondition, InvalidAdapter, InvalidArgument, Unavailable
from .remote import NETWORK_CHUNK_BYTES, RemoteFile, RemoteStores
from .sources import ADAPTER_FILES

BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None, region: str | None):
    """One client per endpoint (boto3 clients are thread-safe; making one costs ~100 ms)."""
    session = boto3.session.Session()
    config = Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
    return session.client("s3", endpoint_url=endpoint_url, region_name=region or session.region_name or "us-east-1",
                          config=config)


class S3Source:
    def __init__(self, source: str, stores: RemoteStores):
        self.shown = source
        bucket, _, prefix = source[len("s3://"):].partition("/")
        if not BUCKET.fullmatch(bucket):
            raise InvalidArgument(f"source: {source!r} does not name a bucket as s3://bucket/prefix (3-63 lowercase "
                                  "letters, digits, '.' or '-')", field="source")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.stores = stores

    @property
    def resolved(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def upload(self, folder: Path) -> None:
        """Put an adapter folder's two files under this prefix (the shared registry's version store)."""
        client = _client(self.stores.s3_endpoint_url, self.stores.s3_region)
        for name in ADAPTER_FILES:
            key = f"{self.prefix}/{name}" if self.prefix else name
            with self._errors(f"s3://{self.bucket}/{key}"):
                client.upload_file(str(folder / name), self.bucket, key)

    def files(self) -> dict[str, RemoteFile]:
        client = _client(self.stores.s3_endpoint_url, self.stores.s3_region)
        return {name: self._file(client, name) for name in ADAPTER_FILES}

    def _file(self, client, name: str) -> RemoteFile:
        key = f"{self.prefix}/{name}" if self.prefix else name
        shown = f"s3://{self.bucket}/{key}"
        with self._errors(shown):
            head = client.head_object(Bucket=self.bucket, Key=key)
        return RemoteFile(int(head["ContentLength"]), shown,
                          lambda: self._stream(client, key, head["ETag"], shown))

    def _stream(self, client, key: str, etag: str, shown: str) -> Iterator[bytes]:
        with self._errors(shown):
            body = client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)["Body"]
            try:
                yield from body.iter_chunks(NETWORK_CHUNK_BYTES)
            finally:
                body.close()

    @contextlib.contextmanager
    def _errors(self, shown: str):
        """The store's errors as client statuses naming the source."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _NOT_FOUND or status == "404":
                raise AdapterNotFound(f"source: {shown} not found (no such bucket or object)", field="source") from None
            if code in _DENIED or status == "403":
                raise FailedPrecondition(f"source: {shown}: access denied with this server's S3 credentials",
                                         field="source") from None
            if code == "PreconditionFailed" or status == "412":
                raise InvalidAdapter(f"source: {shown} changed while it was being copied; retry",
                                     field="source") from None
            raise Unavailable(f"source: {shown}: the S3 store answered {code or status} "
                              f"({error.get('Message', '')}); retry", field="source") from None
        except NoCredentialsError:
            raise FailedPrecondition(f"source: {shown}: this server has no S3 credentials (AWS_ACCESS_KEY_ID and "
                                     "AWS_SECRET_ACCESS_KEY, ~/.aws, or an instance role)", field="source") from None
        except BotoCoreError as exc:
            raise Unavailable(f"source: {shown}: the S3 store could not be read ({exc}); retry",
                              field="source") from None
