"""AdapterManager: the adapters side of the engine - catalog, tiers, loads, and the register/pin/load API.

Registration validates a PEFT folder once (on the caller's thread), writes its prepared image (which host
misses read whole, see adapters/prepared_image.py) and puts the prepared copy in the host tier; requests
resolve their adapter choice into `AdapterNeed`s here; admission asks whether a
sequence's adapters are host-ready, takes device slots for them, and admits the sequence once their fills
have landed (`fills_landed`: on a GPU the copy runs on a side stream while the batch keeps decoding). Slot
changes are made on the engine thread only (`on_engine_thread`), so a running step never sees one under it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ..adapters.cache import READY, AdapterCache, SlotWait
from ..adapters.catalog import AdapterCatalog, AdapterEntry
from ..adapters.loader import load_adapter
from ..adapters.mix import derive_adapter, mix_key
from ..adapters.mix_cache import DerivedAdapterCache
from ..adapters.prepared_image import ImageCorrupt, PreparedImages, image_key
from ..adapters.types import AdapterWeights, check_fits
from ..config import LoRAConfig
from ..lora.slot_filler import SlotFiller
from ..lora.slot_pack import layout_id
from ..lora.stacks import LoraStacks
from ..errors import FailedPrecondition, InvalidAdapter, LoraplexError, ResourceExhausted
from ..model.arch import ModelArch
from ..types import GenerationRequest, MergeMethod
from .sequence import AdapterNeed, Sequence

log = logging.getLogger(__name__)

RunOnEngineThread = Callable[[Callable[[], object], float], object]
"""Runs a callable between steps on the engine thread and returns its result (or raises its error)."""


class AdapterManager:
    def __init__(self, config: LoRAConfig, arch: ModelArch, lora_stacks: LoraStacks, dtype: torch.dtype,
                 device: torch.device, derived_folder, images_folder, run_on_engine_thread: RunOnEngineThread,
                 call_on_engine_thread: Callable[[Callable[[], None]], None]):
        self.config, self.arch, self.device = config, arch, device
        self.catalog = AdapterCatalog()
        self.filler = SlotFiller(lora_stacks, config.staging_bytes, staged=config.staged_fills)
        self.cache = AdapterCache(lora_stacks, self.filler, config.max_cpu_loras, dtype,
                                  max_host_bytes=config.max_cpu_lora_bytes)
        self.derived = DerivedAdapterCache(max_entries=2, folder=derived_folder)
        self.images = PreparedImages(images_folder)
        """Each registered version's prepared form, read whole on a host-tier miss (adapters/prepared_image.py)."""
        self._layout = layout_id(lora_stacks.shapes)
        """The slot layout packs follow (part of each image's key: another layout never reads a stale image)."""
        self._image_keys: dict[str, str] = {}
        """Cache key (name@version) -> its image's content key."""
        """TIES / DARE builds, persisted so a restart reuses them; the host tier holds the live copies."""
        self.mix_reports: dict = {}
        """Reconstruction reports of derived (TIES / DARE) adapters, by key."""
        self._run = run_on_engine_thread
        self._call = call_on_engine_thread

    # ---- the admin API (any thread) ----
    def register(self, name: str, path: str, pin: bool = False, version: int | None = None) -> AdapterEntry:
        """Validate a PEFT folder against the base and make it usable (a new version if the name exists)."""
        if not name:
            raise InvalidAdapter("name: an adapter needs a name", field="name")
        weights = load_adapter(path, self.arch, self.config.max_lora_rank, name)
        return self.register_weights(name, weights, pin=pin, version=version)

    def register_weights(self, name: str, weights: AdapterWeights, pin: bool = False,
                         version: int | None = None, registered_at: float | None = None) -> AdapterEntry:
        """Register adapter weights already in memory (from load_adapter, or built in-process).

        `version`, `registered_at`: what the persistent registry restores (default: the next version, now).
        """
        check_fits(weights, self.arch, self.config.max_lora_rank)
        first = next(iter(weights.modules.values()))
        entry = self.catalog.add(AdapterEntry(
            name=name, version=0, source=weights.source, sha256=weights.sha256, rank=weights.rank,
            alpha=float(weights.config.get("lora_alpha", first.scale * first.rank)),
            target_modules=tuple(sorted(weights.target_modules)), num_bytes=weights.num_bytes,
            base_model=str(weights.config.get("base_model_name_or_path") or ""), pinned=pin,
            registered_at=time.time() if registered_at is None else float(registered_at)), version=version)
        prepared = self.cache.prepare(weights)
        if weights.sha256:  # a registered file (built-in-process adapters have no folder to rebuild from)
            key = image_key(weights.sha256, weights.config, self.cache.dtype, self._layout)
            if self.images.save(key, prepared):
                self._image_keys[entry.key] = key
        self.cache.put_host(entry.key, prepared)
        if pin:
            self._call(lambda: self._pin(entry.key))
        return entry

    def delete(self, name: str) -> AdapterEntry:
        """Unregister; requests already holding this version finish on it."""
        entry = self.catalog.remove(name)
        self._call(lambda: self.cache.drop(entry.key))
        key = self._image_keys.pop(entry.key, None)
        if key is not None and key not in self._image_keys.values():  # (a running request re-reading this
            self.images.remove(key)                                   # version reads its folder instead)
        return entry

    def set_pinned(self, name: str, pinned: bool = True) -> AdapterEntry:
        """Pin: into host memory first when it is not there (read on the calling thread, never the engine's),
        then into a device slot for good; unpin: evictable again."""
        entry = self.catalog.set_pinned(name, pinned)
        if not pinned:
            self._run(lambda: self.cache.unpin(entry.key), 60.0)
            return entry
        self.cache.want([entry.key])  # kept in the host tier until its slot holds it (a full tier would trim it)
        try:
            if self.cache.host_get(entry.key) is None:
                self.cache.put_host(entry.key, self.cache.prepare(self.disk_loader(entry)()))
            self._run(lambda: self._pin(entry.key), 60.0)
            self._wait_landed(entry.key, 60.0)  # in its slot when this returns
        finally:
            self.cache.unwant([entry.key])
        return entry

    def load(self, name: str, timeout: float = 60.0) -> AdapterEntry:
        """Into host memory (read and validated on the calling thread, never the engine's) and into a
        device slot when one can be had now; returns the entry (see cache.state_of for where it landed)."""
        entry = self.catalog.get(name)
        if self.cache.host_get(entry.key) is None:
            self.cache.put_host(entry.key, self.cache.prepare(self.disk_loader(entry)()))

        def to_slot():
            if self.cache.host_get(entry.key) is not None:
                slots = self.cache.acquire([entry.key])
                if not isinstance(slots, SlotWait):
                    self.cache.release(slots)
        self._run(to_slot, timeout)
        self._wait_landed(entry.key, timeout)
        return entry

    def unload(self, name: str, timeout: float = 60.0) -> AdapterEntry:
        """Drop the host and device copies (the adapter stays registered); refused while pinned or in use."""
        entry = self.catalog.get(name)
        if entry.pinned:
            raise FailedPrecondition(f"adapter {name!r} is pinned; unpin it before unloading", field="name")
        if not self._run(lambda: self.cache.unload(entry.key), timeout):
            raise FailedPrecondition(f"adapter {name!r} is in use by running requests; retry when they finish",
                                     field="name")
        return entry

    def _wait_landed(self, key: str, timeout: float) -> None:
        """Caller's thread (never the engine's): wait until `key`'s slot fill, if one runs, has landed."""
        deadline = time.monotonic() + timeout
        while not self._run(lambda: self.cache.fill_landed(key), timeout) and time.monotonic() < deadline:
            time.sleep(0.001)

    def _pin(self, key: str) -> None:
        if self.cache.host_get(key) is None or self.cache.pin(key) is None:
            log.warning("could not pin %s now (not in host memory, slots busy, or it would pin the last slot)",
                        key)

    def disk_loader(self, entry: AdapterEntry) -> Callable[[], AdapterWeights]:
        """A host-tier miss: `entry`'s prepared image, read whole; else (no image, or a damaged one) its folder,
        validated again (a file changed since registration is refused), and the image rebuilt from it."""
        def load():
            key = self._image_keys.get(entry.key)
            if key is not None:
                try:
                    image = self.images.load(key)
                    check_fits(image, self.arch, self.config.max_lora_rank)
                    return image
                except (ImageCorrupt, LoraplexError) as exc:
                    log.warning("adapter %s: prepared image unusable (%s); rebuilding it from the folder",
                                entry.key, exc)
                    self.cache.count_image_rebuild()
            weights = load_adapter(entry.source, self.arch, self.config.max_lora_rank, entry.name)
            if weights.sha256 != entry.sha256:
                raise InvalidAdapter(f"adapter {entry.name!r}: {entry.source} changed on disk since it was "
                                     "registered; register it again")
            prepared = self.cache.prepare(weights)
            if key is not None:
                self.images.save(key, prepared, replace=True)
            return prepared
        return load

    # ---- requests ----
    def resolve(self, request: GenerationRequest) -> tuple[tuple[AdapterNeed, ...], dict[str, int]]:
        """(needs, {adapter name: version}) for a validated request; AdapterNotFound names a missing one.

        LINEAR mixes stay exact and per request: each named adapter takes its own slot and every token
        carries (slot, weight) pairs. TIES / DARE build one derived adapter, keyed by content, once."""
        if request.adapter:
            entry = self.catalog.get(request.adapter)
            return (AdapterNeed(entry.key, 1.0, self.disk_loader(entry)),), {entry.name: entry.version}
        if not request.adapters:
            return (), {}
        entries = [self.catalog.get(item.name) for item in request.adapters]
        weights = [item.weight for item in request.adapters]
        versions = {entry.name: entry.version for entry in entries}
        if request.merge_method is MergeMethod.LINEAR:
            return tuple(AdapterNeed(e.key, w, self.disk_loader(e)) for e, w in zip(entries, weights)), versions
        rank = self.config.derived_rank
        key = "mix:" + mix_key([(e.name, f"{e.version}:{e.sha256}") for e in entries], weights,
                               request.merge_method, request.density, request.merge_seed, rank)
        part_keys = tuple(e.key for e in entries)

        def derive():
            parts = [self.cache.host_get(k) for k in part_keys]
            if any(p is None for p in parts):
                raise InvalidAdapter(f"{key}: a part of the mix left host memory before the mix was built")
            return derive_adapter(parts, weights, request.merge_method, request.density, request.merge_seed,
                                  rank, name=key, device=str(self.device), key=key)

        def build():
            derived, report = self.derived.get_or_build(key, derive)
            self.mix_reports[key] = report
            return derived

        return (AdapterNeed(key, 1.0, build, depends_on=part_keys),), versions

    @staticmethod
    def keys_of(seq: Sequence) -> list[str]:
        """Every cache key a sequence keeps alive (its adapters and the parts of a derived mix)."""
        return [k for need in seq.needs for k in (need.key, *need.depends_on)]

    # ---- admission (engine thread) ----
    def host_ready(self, seq: Sequence) -> str | LoraplexError:
        """READY when every adapter of `seq` is in host memory, LOADING while loads run (started here),
        or the error a load raised."""
        for need in seq.needs:
            states = [self.cache.ensure_host(dep, self._dependency_loader(dep)) for dep in need.depends_on]
            if all(state == READY for state in states):
                states.append(self.cache.ensure_host(need.key, need.loader))
            for state in states:
                if isinstance(state, Exception):
                    return state if isinstance(state, LoraplexError) else LoraplexError(str(state))
            if any(state != READY for state in states):
                return "loading"
        return READY

    def acquire_slots(self, seq: Sequence) -> list[int] | SlotWait | ResourceExhausted:
        """Device slots for `seq`'s adapters ([] for the base model), why not now (SlotWait), or the error when
        pins by other adapters leave too few slots for it ever."""
        keys = [need.key for need in seq.needs]
        if not keys:
            return []
        possible = self.cache.slots_possible(keys)
        if len(set(keys)) > possible:
            return ResourceExhausted(
                f"the request needs {len(set(keys))} adapter slots but other adapters' pins leave "
                f"{possible}; unpin some or raise max_loras", field="adapters")
        return self.cache.acquire(keys)

    def fills_landed(self, seq: Sequence) -> bool:
        """True once every slot `seq` holds reads as its adapter (never waits: queries the fills' events)."""
        return self.cache.fills_landed(seq.slots or [])

    def poll_fills(self) -> None:
        """Between steps: publish slot fills that landed."""
        self.cache.poll_fills()

    def wait_fill_copy(self) -> bool:
        """Engine thread, nothing in flight: block until one queued slot-fill copy has landed (GIL released);
        False at once when none is running."""
        return self.filler.wait_copy()

    def release(self, seq: Sequence) -> None:
        """Give back `seq`'s slots and host-tier claims (finish, cancel, error)."""
        if seq.slots:
            self.cache.release(seq.slots)
            seq.slots = []
        self.cache.unwant(self.keys_of(seq))

    def _dependency_loader(self, key: str):
        name = key.rpartition("@")[0]
        try:
            entry = self.catalog.get(name)
        except LoraplexError:
            entry = None
        if entry is None or entry.key != key:
            def gone():
                raise InvalidAdapter(f"adapter version {key} is no longer registered")
            return gone
        return self.disk_loader(entry)

    def close(self) -> None:
        self.cache.close()
