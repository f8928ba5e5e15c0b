"""The registry store many replicas share: records in PostgreSQL, version folders on a shared volume (`root`),
or in an S3-compatible store (`files`: adapters/s3_versions.py; `root` is then this replica's copy of them).

    loraplex_adapter_names     name -> last_version: one counter row per name, bumped in its own transaction
                               (the row lock serializes two admins: they get two distinct versions)
    loraplex_adapter_versions  (name, version) -> sha256, path, source: written once, never updated
                               (`name@N` names the same bytes everywhere; replicas check the sha256 on load)
    loraplex_adapters          name -> current version and its record (jsonb), replaced only by a newer version

Every change commits together with `pg_notify('loraplex_registry', name)`, which the other replicas
follow (adapters/registry_follower.py). When the database cannot be reached, calls raise Unavailable:
admin calls are refused while serving goes on from what each replica holds.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Protocol

import psycopg
from psycopg.types.json import Jsonb

from ..errors import FailedPrecondition, Unavailable
from .registry_store import StoredRegistry


class VersionFiles(Protocol):
    def publish(self, folder: Path, path: str) -> None: ...

    def fetch(self, path: str, folder: Path) -> None: ...

log = logging.getLogger(__name__)

CHANNEL = "loraplex_registry"
CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT_MS = 10_000
_SCHEMA_LOCK = 0x6C6F7261  # one advisory lock id: replicas starting together create the tables once
_SCHEMA = """
CREATE TABLE IF NOT EXISTS loraplex_adapter_names (
    name text PRIMARY KEY, last_version integer NOT NULL);
CREATE TABLE IF NOT EXISTS loraplex_adapter_versions (
    name text NOT NULL, version integer NOT NULL, sha256 text NOT NULL, path text NOT NULL, source text NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS loraplex_adapters (
    name text PRIMARY KEY, version integer NOT NULL, record jsonb NOT NULL,
    FOREIGN KEY (name, version) REFERENCES loraplex_adapter_versions (name, version));
"""


def connect(url: str, autocommit: bool = False) -> psycopg.Connection:
    """A connection with bounded connect and statement times; Unavailable when the database cannot be reached."""
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                               options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
    except psycopg.OperationalError as exc:
        raise Unavailable(f"registry database: cannot connect ({_first_line(exc)}); admin calls are refused "
                          "until it is back") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class PostgresStore:
    """RegistryStore over PostgreSQL (`url`), version folders under `root` (and published to `files`, if any)."""

    shared = True

    def __init__(self, url: str, root: str | Path, files: VersionFiles | None = None):
        self.url = url
        self.root = Path(root)
        self.files = files
        """Where versions are published and fetched from when `root` is not itself shared (else None)."""
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._schema_ready = False

    @contextlib.contextmanager
    def _transaction(self):
        """One transaction on the store's connection; a lost connection is dropped (next call reconnects)."""
        with self._lock:
            try:
                self._ensure_connection()
                with self._conn.transaction():
                    if not self._schema_ready:
                        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                        self._conn.execute(_SCHEMA)
                    yield self._conn
                self._schema_ready = True
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._drop()
                raise Unavailable(f"registry database: unreachable ({_first_line(exc)}); admin calls are refused "
                                  "until it is back") from None

    def _ensure_connection(self) -> None:
        """A live connection: a kept one is pinged first, so the first call after a database restart does not
        fail on the connection the restart broke."""
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                self._drop()
        self._conn = connect(self.url, autocommit=True)  # each call's own transaction() is BEGIN ... COMMIT

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def read_all(self) -> StoredRegistry:
        with self._transaction() as conn:
            rows = conn.execute("SELECT name, record FROM loraplex_adapters").fetchall()
            counters = conn.execute("SELECT name, last_version FROM loraplex_adapter_names").fetchall()
        return StoredRegistry({name: dict(record) for name, record in rows}, {n: int(v) for n, v in counters})

    def read(self, name: str) -> dict | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT record FROM loraplex_adapters WHERE name = %s", (name,)).fetchone()
        return dict(row[0]) if row else None

    def next_version(self, name: str, after: int) -> int:
        with self._transaction() as conn:
            row = conn.execute(
                "INSERT INTO loraplex_adapter_names AS n (name, last_version) VALUES (%(name)s, %(after)s + 1) "
                "ON CONFLICT (name) DO UPDATE SET last_version = GREATEST(n.last_version, %(after)s) + 1 "
                "RETURNING last_version", dict(name=name, after=after)).fetchone()
        return int(row[0])

    def put(self, name: str, record: dict) -> bool:
        version = int(record["version"])
        with self._transaction() as conn:
            conn.execute("INSERT INTO loraplex_adapter_versions (name, version, sha256, path, source) "
                         "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (name, version, record["sha256"], record["path"], record.get("source", "")))
            (sha256,) = conn.execute("SELECT sha256 FROM loraplex_adapter_versions WHERE name = %s AND version = %s",
                                     (name, version)).fetchone()
            if sha256 != record["sha256"]:
                raise FailedPrecondition(f"adapter {name!r}: version {version} is recorded with other weights "
                                         "(versions are immutable)", field="name")
            applied = conn.execute(
                "INSERT INTO loraplex_adapters AS a (name, version, record) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, record = EXCLUDED.record "
                "WHERE a.version <= EXCLUDED.version", (name, version, Jsonb(record))).rowcount == 1
            self._notify(conn, name)
        return applied

    def revert(self, name: str, version: int, previous: dict | None) -> None:
        with self._transaction() as conn:
            if previous is None:
                conn.execute("DELETE FROM loraplex_adapters WHERE name = %s AND version = %s", (name, version))
            else:
                conn.execute("UPDATE loraplex_adapters SET version = %s, record = %s WHERE name = %s AND version = %s",
                             (int(previous["version"]), Jsonb(previous), name, version))
            self._notify(conn, name)

    def remove(self, name: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM loraplex_adapters WHERE name = %s", (name,))
            self._notify(conn, name)

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE loraplex_adapters SET record = jsonb_set(record, '{pinned}', %s) WHERE name = %s",
                         (Jsonb(bool(pinned)), name))
            self._notify(conn, name)

    def save_stats(self, stats: dict[str, tuple[int, float | None]]) -> None:
        """Use counts stay per replica (each counts what it served); nothing is written."""

    def publish(self, folder: Path, path: str) -> None:
        if self.files is not None:
            self.files.publish(folder, path)

    def fetch(self, path: str, folder: Path) -> None:
        if self.files is None:
            raise FileNotFoundError(f"{folder} is missing from the shared adapter dir")
        self.files.fetch(path, folder)

    def close(self) -> None:
        with self._lock:
            self._drop()

    @staticmethod
    def _notify(conn: psycopg.Connection, name: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))
