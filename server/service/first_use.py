"""Load on first use: a request naming an unregistered adapter that an `--adapter-source` rule takes waits
while the server registers it, once.

Single flight on the event loop: the first request for a name starts the registration on a thread; every
other request for that name that arrives meanwhile awaits the same task, so 50 requests together make one
registration. Requests for anything else never wait for it (only those awaiting the task do), and the
registration's own work (download, validation) runs off the event loop and off the request workers. A
failed registration fails every request waiting for it with the registration's status; the next request
tries again. Registrations run on their own few threads (never the event loop's default executor, which
admin calls use); at most `max_pending` names wait or load at once, beyond that RESOURCE_EXHAUSTED, so a
flood of made-up names cannot queue work without bound.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Protocol

from ..adapters.source_rules import SourceRule, source_for
from ..errors import LoraplexError, ResourceExhausted

log = logging.getLogger(__name__)


class Registrar(Protocol):
    def is_registered(self, name: str) -> bool: ...

    def register(self, name: str, source: str, pin: bool = False, preload: bool = False,
                 should_stop: Callable[[], bool] | None = None): ...


class FirstUseLoader:
    def __init__(self, rules: tuple[SourceRule, ...], registry: Registrar, should_stop: Callable[[], bool],
                 threads: int = 4, max_pending: int = 64):
        self.rules, self.registry, self.should_stop = rules, registry, should_stop
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="first-use")
        self.registrations = 0
        """Registrations started here (the tests count them)."""
        self.joined = 0
        """Requests that waited for a registration another request had started."""
        self._in_flight: dict[str, asyncio.Task] = {}

    async def ensure(self, names: Iterable[str]) -> None:
        """Return once every name that a rule takes is registered; raise the status of a failed registration."""
        for name in names:
            if self.registry.is_registered(name):
                continue
            source = source_for(self.rules, name)
            if source is not None:
                await self._register_once(name, source)

    async def _register_once(self, name: str, source: str) -> None:
        task = self._in_flight.get(name)
        if task is None:
            if len(self._in_flight) >= self.max_pending:
                raise ResourceExhausted(f"adapter: {len(self._in_flight)} adapters are being loaded on first use; "
                                        f"retry {name!r} later", field="adapter")
            log.info("adapter %s: not registered; loading it on first use from %s", name, source)
            self.registrations += 1
            register = functools.partial(self.registry.register, name, source, should_stop=self.should_stop)
            task = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(self._executor, register))
            self._in_flight[name] = task
            task.add_done_callback(lambda done: self._finished(name, done))
        else:
            self.joined += 1
        try:
            await asyncio.shield(task)
        except LoraplexError as exc:
            raise type(exc)(f"adapter: {name!r} is not registered, and loading it on first use from {source} "
                            f"failed: {exc.message}", field="adapter") from None

    def _finished(self, name: str, task: asyncio.Task) -> None:
        self._in_flight.pop(name, None)
        error = None if task.cancelled() else task.exception()  # retrieved even when every waiter has gone
        if error is not None:
            log.warning("adapter %s: loading on first use failed (%s)", name, error)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
