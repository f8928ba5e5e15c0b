"""Following a shared registry: what other replicas register, upload, delete or pin reaches this one's engine.

One thread holds a LISTEN connection to the registry database. Each notification names one adapter,
which is synced from the database (the payload is a hint, never the data). After every (re)connect the
whole registry is synced, so a replica that lost the database catches up as soon as it is back; a
`SELECT 1` every `ping_seconds` notices a lost connection while no notification comes.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import psycopg

from ..errors import LoraplexError, Unavailable
from .pg_store import CHANNEL, connect

log = logging.getLogger(__name__)


class RegistryFollower:
    def __init__(self, url: str, sync_name: Callable[[str], None], sync_all: Callable[[], None],
                 ping_seconds: float = 1.0, retry_seconds: float = 0.5):
        self.url, self.sync_name, self.sync_all = url, sync_name, sync_all
        self.ping_seconds, self.retry_seconds = ping_seconds, retry_seconds
        self.connected = threading.Event()
        """Set while the LISTEN connection is up and the catch-up sync after it has run."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        lost = False
        while not self._stop.is_set():
            try:
                with connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.sync_all()
                    self.connected.set()
                    if lost:
                        log.info("registry database: back; caught up")
                    lost = False
                    self._follow(conn)
            except (psycopg.Error, LoraplexError) as exc:
                if not lost:
                    log.warning("registry database: lost (%s); serving what this replica holds, retrying",
                                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                lost = True
            except Exception:  # a bug in a sync must not end the following
                log.exception("registry follower: sync failed; reconnecting")
            self.connected.clear()
            self._stop.wait(self.retry_seconds)

    def _follow(self, conn: psycopg.Connection) -> None:
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=self.ping_seconds):
                try:
                    self.sync_name(notify.payload)
                except Unavailable:  # the store's own connection went: reconnect, then sync everything
                    raise
                except LoraplexError as exc:
                    log.warning("adapter %s: not synced from the registry (%s)", notify.payload, exc)
            conn.execute("SELECT 1")
