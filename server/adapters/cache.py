"""Adapter tiers: disk -> host (validated, prepared, LRU) -> device slots (LRU, pins, refcounts).

Loads from disk (and mix builds) run on a loader thread, never on the engine thread. A host copy is
packed as one device slot takes it (lora.slot_pack); installing it in a slot starts a fill (lora.slot_filler:
on a GPU, a staged asynchronous copy on a side stream) and the slot is published (readable) once the fill has
landed: `fills_landed` says when, without waiting. A slot whose adapter is used by a sequence (refcount > 0,
taken at admission, also while its fill runs) or pinned is never evicted; a host copy wanted by a live
request is never dropped. Eviction zeroes nothing: ranks go to 0 and the kernels read only rank rows.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ..lora.prepare import prepare_for_device
from ..lora.slot_filler import FillTicket, SlotFiller
from ..lora.slot_pack import pack_adapter
from ..lora.stacks import LoraStacks
from .types import AdapterWeights

log = logging.getLogger(__name__)

READY, LOADING = "ready", "loading"


class SlotWait(enum.Enum):
    """Why `AdapterCache.acquire` could not give slots now."""

    SLOTS = "slots"
    """Too few slots are free or evictable: wait for a release (admission stops here, first come first served)."""
    STAGING = "staging"
    """Slots are there but every staging buffer is lent to fills in progress: wait for one to land (requests
    whose adapters are resident may go ahead meanwhile)."""


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    host_evictions: int = 0
    load_seconds_total: float = 0.0
    loads: int = 0
    installs: int = 0
    """Adapters copied into a device slot (device-tier misses)."""
    staging_waits: int = 0
    """Installs put off because every pinned staging buffer was lent (a bigger --lora-staging-bytes helps)."""
    image_rebuilds: int = 0
    """Host misses that found an adapter's prepared image damaged or missing and rebuilt it from its folder."""


@dataclass(slots=True)
class _Slot:
    key: str | None = None
    refs: int = 0
    pinned: bool = False
    last_used: float = 0.0
    targets: frozenset = frozenset()
    fill: FillTicket | None = None
    """The fill still landing (None: the slot reads as its adapter)."""


class AdapterCache:
    def __init__(self, lora_stacks: LoraStacks, filler: SlotFiller, max_host: int, dtype: torch.dtype,
                 max_host_bytes: int | None = None):
        self.lora_stacks, self.filler = lora_stacks, filler
        num_slots = lora_stacks.num_slots
        self.dtype = dtype
        self.max_host, self.max_host_bytes = max_host, max_host_bytes
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._host: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._host_bytes: dict[str, int] = {}
        """num_bytes of each host copy, counted once when it enters (the byte bound is checked on every trim)."""
        self._wanted: Counter[str] = Counter()
        self._loading: dict[str, Future] = {}
        self._failed: dict[str, Exception] = {}
        self._load_seconds: deque[float] = deque(maxlen=100_000)
        """Durations of the latest host loads (for load-latency percentiles)."""
        self._dropped: set[str] = set()
        """Deleted adapters still used by running requests: freed when the last one lets go."""
        self._slots = [_Slot() for _ in range(num_slots)]
        self._slot_of: dict[str, int] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")

    # ---- host tier (any thread) ----
    def prepare(self, adapter: AdapterWeights) -> AdapterWeights:
        """Scales folded, compute dtype, packed as a slot takes it (ordinary memory: fills stage it pinned)."""
        return pack_adapter(prepare_for_device(adapter, self.dtype, pin=False), self.lora_stacks.shapes,
                            self.lora_stacks.max_rank)

    def put_host(self, key: str, prepared: AdapterWeights) -> None:
        with self._lock:
            self._host[key] = prepared
            self._host_bytes[key] = prepared.num_bytes
            self._host.move_to_end(key)
            self._failed.pop(key, None)
            self._trim_host()

    def _drop_host(self, key: str) -> None:
        """Remove `key`'s host copy, if any (lock held)."""
        self._host.pop(key, None)
        self._host_bytes.pop(key, None)

    def host_bytes(self) -> int:
        """Bytes of the prepared adapters in the host tier."""
        with self._lock:
            return sum(self._host_bytes.values())

    def load_seconds(self) -> list[float]:
        """Durations of the latest host loads (disk or image to prepared host copy), oldest first."""
        with self._lock:
            return list(self._load_seconds)

    def count_image_rebuild(self) -> None:
        with self._lock:
            self.stats.image_rebuilds += 1

    def host_get(self, key: str) -> AdapterWeights | None:
        with self._lock:
            return self._host.get(key)

    def want(self, keys) -> None:
        """A live request needs these keys: keep their host copies."""
        with self._lock:
            self._wanted.update(keys)

    def unwant(self, keys) -> None:
        with self._lock:
            self._wanted.subtract(keys)
            for key in keys:
                if self._wanted[key] <= 0:
                    del self._wanted[key]
                    self._failed.pop(key, None)
                    if key in self._dropped:
                        self._drop_host(key)
            self._trim_host()

    def ensure_host(self, key: str, loader: Callable[[], AdapterWeights]) -> str | Exception:
        """READY, LOADING (a load is under way on the loader thread) or the exception the load raised."""
        with self._lock:
            if key in self._host:
                self._host.move_to_end(key)
                return READY
            if key in self._failed:
                return self._failed[key]
            if key not in self._loading:
                self.stats.misses += 1
                self._loading[key] = self._executor.submit(self._load, key, loader)
            return LOADING

    def _load(self, key: str, loader: Callable[[], AdapterWeights]) -> None:
        started = time.monotonic()
        try:
            prepared = self.prepare(loader())
        except Exception as exc:  # reported to the requests that wanted it
            log.warning("adapter %s failed to load: %s", key, exc)
            with self._lock:
                self._failed[key] = exc
                self._loading.pop(key, None)
            return
        seconds = time.monotonic() - started
        with self._lock:
            self._loading.pop(key, None)
            self.stats.loads += 1
            self.stats.load_seconds_total += seconds
            self._load_seconds.append(seconds)
        self.put_host(key, prepared)
        log.info("adapter %s loaded to host: %d bytes in %.0f ms", key, prepared.num_bytes, seconds * 1000)

    def _trim_host(self) -> None:
        """Drop least recently used host copies past max_host (and max_host_bytes), skipping wanted or slotted
        ones (lock held)."""
        excess = len(self._host) - self.max_host
        excess_bytes = (sum(self._host_bytes.values()) - self.max_host_bytes
                        if self.max_host_bytes is not None else 0)
        for key in list(self._host):
            if excess <= 0 and excess_bytes <= 0:
                break
            if self._wanted.get(key, 0) > 0 or key in self._slot_of:
                continue
            excess_bytes -= self._host_bytes[key]
            self._drop_host(key)
            self.stats.host_evictions += 1
            excess -= 1

    def drop(self, key: str) -> None:
        """Forget a key (adapter deleted); its slot and host copy go now if unused, else when released."""
        with self._lock:
            self._dropped.add(key)
            if self._wanted.get(key, 0) <= 0:
                self._drop_host(key)
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slots[slot].pinned = False
            if self._slots[slot].refs == 0:
                self._evict(slot)

    def unload(self, key: str) -> bool:
        """Engine thread: drop `key`'s slot and host copy; False (nothing dropped) if pinned or in use."""
        slot = self._slot_of.get(key)
        if slot is not None and (self._slots[slot].refs > 0 or self._slots[slot].pinned):
            return False
        with self._lock:
            if self._wanted.get(key, 0) > 0:
                return False
            self._drop_host(key)
        if slot is not None:
            self._evict(slot)
        return True

    # ---- device tier (engine thread only) ----
    def acquire(self, keys: list[str]) -> list[int] | SlotWait:
        """Slots for all `keys` (host-ready), refcounted; else why not now (too few slots can be freed, or no
        staging buffer is free for a fill). A slot may still be filling: see `fills_landed`."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._slot_of]
        if missing:
            free = [i for i, s in enumerate(self._slots) if s.key is None]
            evictable = sorted((i for i, s in enumerate(self._slots)
                                if s.key is not None and s.refs == 0 and not s.pinned and s.key not in keys),
                               key=lambda i: self._slots[i].last_used)
            if len(missing) > len(free) + len(evictable):
                return SlotWait.SLOTS
            for key in missing:
                slot = free.pop() if free else evictable.pop(0)
                if not self._install(slot, key):
                    return SlotWait.STAGING
        else:
            self.stats.hits += len(keys)
        now = time.monotonic()
        slots = [self._slot_of[k] for k in keys]
        for slot in slots:
            self._slots[slot].refs += 1
            self._slots[slot].last_used = now
        return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            state = self._slots[slot]
            state.refs -= 1
            assert state.refs >= 0, f"slot {slot} released more often than acquired"
            if state.refs == 0 and state.key in self._dropped:
                self._evict(slot)

    def pin(self, key: str, keep_unpinned: int = 1) -> int | None:
        """Keep `key` in a slot for good (host-ready required); None if the slots are busy or if pinning
        would leave fewer than `keep_unpinned` slots for every other adapter."""
        pinned = sum(s.pinned for s in self._slots if s.key != key)
        if pinned + 1 > len(self._slots) - keep_unpinned:
            return None
        slots = self.acquire([key])
        if isinstance(slots, SlotWait):
            return None
        self._slots[slots[0]].pinned = True
        self.release(slots)
        return slots[0]

    def slots_possible(self, keys: list[str]) -> int:
        """Slots a request for `keys` could ever hold: every slot not pinned by another adapter."""
        return sum(1 for s in self._slots if not s.pinned or s.key in keys)

    def unpin(self, key: str) -> None:
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slots[slot].pinned = False

    def fills_landed(self, slots: list[int]) -> bool:
        """Engine thread: True when every slot of `slots` reads as its adapter (publishing those that landed)."""
        landed = True
        for slot in slots:
            state = self._slots[slot]
            if state.fill is not None:
                if self.filler.landed(state.fill):
                    self._publish(slot)
                else:
                    landed = False
        return landed

    def fill_landed(self, key: str) -> bool:
        """Engine thread: False only while `key` holds a slot whose fill is still landing."""
        slot = self._slot_of.get(key)
        return slot is None or self.fills_landed([slot])

    def poll_fills(self) -> None:
        """Engine thread, every step: publish fills that landed (pins and loads with no request waiting too)."""
        self.filler.poll()
        filling = [slot for slot, state in enumerate(self._slots) if state.fill is not None]
        if filling:
            self.fills_landed(filling)

    def _install(self, slot: int, key: str) -> bool:
        """Start filling `slot` with `key`; False (nothing changed) while no staging buffer is free."""
        adapter = self.host_get(key)
        assert adapter is not None and adapter.pack is not None, f"{key} is not in the host tier"
        if not self.filler.has_room(adapter.pack.num_bytes):  # before evicting: a failed install changes nothing
            self.stats.staging_waits += 1
            return False
        if self._slots[slot].key is not None:
            self._evict(slot)  # ranks to 0 for later steps; the fill waits for the steps already queued
        ticket = self.filler.start(slot, adapter.pack)
        assert ticket is not None, "the staging pool had room a moment ago (the engine thread is its only taker)"
        self._slots[slot] = _Slot(key=key, last_used=time.monotonic(), targets=adapter.target_modules, fill=ticket)
        self._slot_of[key] = slot
        self.stats.installs += 1
        log.info("adapter %s -> slot %d (%d bytes)", key, slot, adapter.num_bytes)
        if self.filler.landed(ticket):  # at once on the CPU
            self._publish(slot)
        return True

    def _publish(self, slot: int) -> None:
        state = self._slots[slot]
        self.lora_stacks.publish(slot, state.fill.pack)
        state.fill = None

    def _evict(self, slot: int) -> None:
        key = self._slots[slot].key
        if self._slots[slot].fill is not None:
            self.filler.abandon(self._slots[slot].fill)
        self._slot_of.pop(key, None)
        self._slots[slot] = _Slot()
        self.lora_stacks.clear(slot)
        self.stats.evictions += 1
        log.info("adapter %s evicted from slot %d", key, slot)

    # ---- views ----
    def slot_targets(self) -> dict[int, frozenset[str]]:
        """slot -> projections its adapter adapts (for the per-step LoRA metadata)."""
        return {slot: state.targets for slot, state in enumerate(self._slots) if state.key is not None}

    def _on_device(self) -> list[str]:
        """Keys whose slot reads as them (fills landed)."""
        return [key for key, slot in list(self._slot_of.items()) if self._slots[slot].fill is None]

    def state_of(self, key: str) -> str:
        """REGISTERED, LOADING, HOST or DEVICE (API.md's AdapterInfo.state); a slot still filling is HOST."""
        slot = self._slot_of.get(key)
        if slot is not None and self._slots[slot].fill is None:
            return "DEVICE"
        with self._lock:
            if key in self._host:
                return "HOST"
            if key in self._loading:
                return "LOADING"
        return "REGISTERED"

    def resident_counts(self) -> dict[str, int]:
        with self._lock:
            return {"device": len(self._on_device()), "host": len(self._host)}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of adapter weights per tier (device: the adapters' own bytes, not their padded slots)."""
        with self._lock:
            device = sum(self._host_bytes.get(k, 0) for k in self._on_device())
            return {"device": device, "host": sum(self._host_bytes.values())}

    def resident_keys(self) -> dict[str, list[str]]:
        """tier -> the adapter versions (`name@version`) it holds now."""
        with self._lock:
            return {"device": sorted(self._on_device()), "host": sorted(self._host)}

    def slot_refs(self) -> list[int]:
        return [s.refs for s in self._slots]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.filler.close()
