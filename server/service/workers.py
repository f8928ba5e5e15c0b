"""A bounded pool for the CPU-heavy part of a request (validation, chat template, tokenizing), so that
the grpc.aio event loop only moves bytes: health checks and small requests answer in their normal
time while a large prompt is tokenized beside them.

The pool has a few threads and a bounded queue: a job past `max_pending` is refused at once with
RESOURCE_EXHAUSTED (never queued without bound). A job whose caller goes away while it runs is
left to finish, and its result goes to `on_orphan` (e.g. a submitted request's handle is cancelled).
"""
from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..errors import ResourceExhausted

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, workers: int, max_pending: int):
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="request-worker")
        self.max_pending = max_pending
        self.pending = 0
        """Jobs queued or running; read and written on the event loop only."""

    async def run(self, fn: Callable, *args, on_orphan: Callable | None = None):
        """fn(*args) on a worker thread; its result, or its exception."""
        if self.pending >= self.max_pending:
            raise ResourceExhausted(f"server busy: {self.pending} requests are being prepared (max_pending_requests="
                                    f"{self.max_pending}); retry later")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        self.pending += 1
        future.add_done_callback(self._done)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if on_orphan is not None:
                future.add_done_callback(functools.partial(_hand_to, on_orphan))
            raise

    def _done(self, future: asyncio.Future) -> None:
        self.pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _hand_to(on_orphan: Callable, future: asyncio.Future) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    try:
        on_orphan(future.result())
    except Exception:  # cleanup of an abandoned job must not break the loop
        log.exception("cleaning up an abandoned request failed")
