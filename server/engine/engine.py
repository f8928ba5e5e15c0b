"""The engine: one thread owns the model; requests come in through submit() from any thread.

    submit -> validate, tokenize, resolve adapters -> incoming queue (bounded)
    step   -> control ops (pin, delete) -> cancellations and deadlines -> schedule (admission:
              adapters host-ready, slots, KV blocks) -> one batched forward + sample -> emit chunks
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch

from ..adapters.cache import READY, AdapterCache
from ..adapters.catalog import AdapterCatalog, AdapterEntry
from ..adapters.loader import load_adapter
from ..adapters.mix_cache import DerivedAdapterCache
from ..adapters.types import AdapterWeights, check_fits
from ..config import EngineConfig
from ..errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidAdapter, LoraplexError,
                      ResourceExhausted, Unavailable)
from ..lora.slots import LoraSlots
from ..model.embedded import default_cache_dir
from ..model.loader import LoadedModel, load_model
from ..types import GenerationChunk, GenerationRequest, GenerationResult, StopReason
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .graphs import DecodeGraphs
from .handle import RequestHandle
from .kv_cache import allocate_kv_cache, kv_bytes_per_block
from .mixes import resolve_adapters
from .outputs import process_sampled
from .requests import RequestLimits, prompt_byte_limit, tokenize_request, validate_request
from .runner import ModelRunner
from .scheduler import Admission, Scheduler
from .sequence import Sequence, SeqStatus
from .stop import StopChecker

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config = config or EngineConfig()
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.loaded = loaded or load_model(config.model, cache_dir)
        self.model, self.arch, self.tokenizer = self.loaded.model, self.loaded.arch, self.loaded.tokenizer
        self.device, self.dtype = self.model.device, self.model.dtype
        lora = config.lora
        self.lora_slots = LoraSlots(self.model, lora.max_loras, lora.max_lora_rank)
        block_size = config.cache.block_size
        num_blocks = config.cache.num_blocks or self._fit_num_blocks(block_size)
        self.kv_caches = allocate_kv_cache(self.arch, num_blocks, block_size, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(config.scheduler)
        model_len = min(config.model.max_model_len or self.arch.max_position_embeddings,
                        self.block_manager.capacity * block_size)
        graphs = None
        if self.device.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention re-plans every step: ms of CPU each
            if not config.model.enforce_eager:
                graphs = DecodeGraphs(self.model, self.kv_caches, self.lora_slots, block_size,
                                      config.scheduler.max_num_seqs, model_len)
        self.runner = ModelRunner(self.model, self.kv_caches, self.lora_slots, block_size, graphs=graphs)
        self.catalog = AdapterCatalog()
        self.derived_adapters = DerivedAdapterCache(max_entries=2, folder=cache_dir / "derived")
        """TIES / DARE builds, persisted so a restart reuses them; the host tier holds the live copies."""
        self.cache = AdapterCache(self.lora_slots, lora.max_cpu_loras, self.dtype,
                                  pin_memory=self.device.type == "cuda")
        self.limits = RequestLimits(
            max_model_len=model_len, max_new_tokens_limit=config.scheduler.max_new_tokens_limit,
            default_max_new_tokens=config.scheduler.default_max_new_tokens,
            max_top_logprobs=config.scheduler.max_top_logprobs,
            max_adapters_per_request=lora.max_adapters_per_request, vocab_size=self.arch.vocab_size,
            max_prompt_bytes=prompt_byte_limit(model_len, self.tokenizer))
        self.eos_token_ids = frozenset(self.arch.eos_token_ids) | frozenset(
            [self.tokenizer.eos_token_id] if self.tokenizer is not None and self.tokenizer.eos_token_id is not None
            else [])
        self._lock = threading.Lock()
        self._incoming: collections.deque[Sequence] = collections.deque()
        self._control: collections.deque = collections.deque()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._accepting = True
        self._next_seq_id = 0
        self.generated_tokens_total = 0
        self.steps_total = 0
        self.mix_reports: dict = {}
        """Reconstruction reports of derived (TIES / DARE) adapters, by key."""
        log.info("engine ready: %d KV blocks of %d tokens, %d adapter slots of rank %d, max_model_len %d",
                 num_blocks, block_size, lora.max_loras, lora.max_lora_rank, model_len)

    def _fit_num_blocks(self, block_size: int) -> int:
        per_block = kv_bytes_per_block(self.arch, block_size, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * self.config.cache.memory_fraction) - used
        else:
            budget = self.config.cache.cpu_cache_bytes
        blocks = budget // per_block
        if blocks < 2:
            raise ResourceExhausted(f"no memory left for the KV cache ({budget} bytes for blocks of {per_block})")
        return int(blocks)

    # ---- adapters ----
    def register_adapter(self, name: str, path: str, pin: bool = False, version: int | None = None) -> AdapterEntry:
        """Validate a PEFT folder against the base and make it usable (a new version if the name exists)."""
        if not name:
            raise InvalidAdapter("name: an adapter needs a name", field="name")
        weights = load_adapter(path, self.arch, self.config.lora.max_lora_rank, name)
        return self.register_weights(name, weights, pin=pin, version=version)

    def register_weights(self, name: str, weights: AdapterWeights, pin: bool = False,
                         version: int | None = None, registered_at: float | None = None) -> AdapterEntry:
        """Register adapter weights already in memory (from load_adapter, or built in-process).

        `version`, `registered_at`: what the persistent registry restores (default: the next version, now).
        """
        check_fits(weights, self.arch, self.config.lora.max_lora_rank)
        first = next(iter(weights.modules.values()))
        entry = self.catalog.add(AdapterEntry(
            name=name, version=0, source=weights.source, sha256=weights.sha256, rank=weights.rank,
            alpha=float(weights.config.get("lora_alpha", first.scale * first.rank)),
            target_modules=tuple(sorted(weights.target_modules)), num_bytes=weights.num_bytes,
            base_model=str(weights.config.get("base_model_name_or_path") or ""), pinned=pin,
            registered_at=time.time() if registered_at is None else float(registered_at)), version=version)
        self.cache.put_host(entry.key, self.cache.prepare(weights))
        if pin:
            self._call_on_engine_thread(lambda: self._pin(entry.key))
        return entry

    def delete_adapter(self, name: str) -> AdapterEntry:
        """Unregister; requests already holding this version finish on it."""
        entry = self.catalog.remove(name)
        self._call_on_engine_thread(lambda: self.cache.drop(entry.key))
        return entry

    def pin_adapter(self, name: str, pinned: bool = True) -> AdapterEntry:
        entry = self.catalog.set_pinned(name, pinned)
        self._call_on_engine_thread(lambda: self._pin(entry.key) if pinned else self.cache.unpin(entry.key))
        return entry

    def load_adapter(self, name: str, timeout: float = 60.0) -> AdapterEntry:
        """Into host memory (read and validated on the calling thread, never the engine's) and into a
        device slot when one can be had now; returns the entry (see cache.state_of for where it landed)."""
        entry = self.catalog.get(name)
        if self.cache.host_get(entry.key) is None:
            self.cache.put_host(entry.key, self.cache.prepare(self._disk_loader(entry)()))

        def to_slot():
            if self.cache.host_get(entry.key) is not None:
                slots = self.cache.acquire([entry.key])
                if slots is not None:
                    self.cache.release(slots)
        self.run_on_engine_thread(to_slot, timeout)
        return entry

    def unload_adapter(self, name: str, timeout: float = 60.0) -> AdapterEntry:
        """Drop the host and device copies (the adapter stays registered); refused while pinned or in use."""
        entry = self.catalog.get(name)
        if entry.pinned:
            raise FailedPrecondition(f"adapter {name!r} is pinned; unpin it before unloading", field="name")
        if not self.run_on_engine_thread(lambda: self.cache.unload(entry.key), timeout):
            raise FailedPrecondition(f"adapter {name!r} is in use by running requests; retry when they finish",
                                     field="name")
        return entry

    def run_on_engine_thread(self, fn: Callable, timeout: float = 60.0):
        """Run `fn` between steps on the engine thread (inline when none runs); its result or exception."""
        future: Future = Future()

        def call():
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)
        self._call_on_engine_thread(call)
        return future.result(timeout)

    def _pin(self, key: str) -> None:
        if self.cache.host_get(key) is None or self.cache.pin(key) is None:
            log.warning("could not pin %s now (not in host memory, slots busy, or it would pin the last slot)",
                        key)

    def _disk_loader(self, entry: AdapterEntry):
        def load():
            weights = load_adapter(entry.source, self.arch, self.config.lora.max_lora_rank, entry.name)
            if weights.sha256 != entry.sha256:
                raise InvalidAdapter(f"adapter {entry.name!r}: {entry.source} changed on disk since it was "
                                     "registered; register it again")
            return weights
        return load

    # ---- requests ----
    def submit(self, request: GenerationRequest,
               listener: Callable[[GenerationChunk], None] | None = None) -> RequestHandle:
        """Validate and queue; raises InvalidArgument / AdapterNotFound / ResourceExhausted / Unavailable.

        `listener`: called on the engine thread with each chunk instead of queueing it (RequestHandle).
        """
        if not self._accepting:
            raise Unavailable("the engine is shutting down")
        validate_request(request, self.limits)
        prompt_ids = tokenize_request(request, self.tokenizer, self.limits)
        needs, versions = resolve_adapters(self, request)
        max_new = request.stopping.max_new_tokens or self.limits.default_max_new_tokens
        max_new = min(max_new, self.limits.max_model_len - len(prompt_ids))
        request_id = request.request_id or uuid.uuid4().hex
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(64)
        handle = RequestHandle(request_id, listener)
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        with self._lock:
            queued = len(self._incoming) + len(self.scheduler.waiting)
            if queued >= self.config.scheduler.max_waiting:
                raise ResourceExhausted(f"queue full: {queued} requests waiting (max_waiting="
                                        f"{self.config.scheduler.max_waiting}); retry later")
            seq = Sequence(seq_id=self._next_seq_id, request=request, request_id=request_id, prompt_ids=prompt_ids,
                           max_new_tokens=max_new, seed=seed, needs=needs, adapter_versions=versions, handle=handle,
                           detokenizer=detok, stop_checker=StopChecker(request.stopping.stop_sequences))
            self._next_seq_id += 1
            self._incoming.append(seq)
        self._wakeup.set()
        return handle

    def generate(self, requests: list[GenerationRequest], timeout: float | None = None) -> list[GenerationResult]:
        """Submit all, run them (stepping inline when no engine thread runs), return results in order."""
        handles = [self.submit(r) for r in requests]
        if self._thread is None:
            while not all(h.done for h in handles):
                if not self.step():  # nothing runnable (an adapter loading): let the loader have the GIL
                    self._wakeup.wait(0.005)
                    self._wakeup.clear()
        return [h.result(timeout) for h in handles]

    # ---- the loop ----
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop accepting; let running work finish for up to grace_seconds, cancel the rest, stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + grace_seconds
        while self.has_work() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.01)
        self._call_on_engine_thread(self._cancel_all)
        if self._thread is not None:
            self._stopping.set()
            self._wakeup.set()
            self._thread.join()
            self._thread = None
        else:
            self._run_control()
        self.cache.close()

    def has_work(self) -> bool:
        return bool(self._incoming or self.scheduler.has_work())

    def adapter_keys_in_use(self, timeout: float = 60.0) -> set[str]:
        """Adapter cache keys that queued or running requests use (their files must stay on disk)."""
        def collect():
            with self._lock:
                seqs = [*self._incoming, *self.scheduler.waiting, *self.scheduler.running]
            return {key for seq in seqs for need in seq.needs for key in (need.key, *need.depends_on)}
        return self.run_on_engine_thread(collect, timeout)

    @property
    def accepting(self) -> bool:
        """False once stop() began: submit() raises Unavailable."""
        return self._accepting

    # ---- gauges (read from any thread, e.g. by the metrics collector) ----
    def queue_depth(self) -> int:
        """Requests submitted but not yet running."""
        return len(self._incoming) + len(self.scheduler.waiting)

    def running_batch_size(self) -> int:
        return len(self.scheduler.running)

    def kv_usage(self) -> float:
        """Share of KV blocks in use or promised to running sequences."""
        return self.block_manager.usage

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self.step()
            except Exception:  # a bug: keep the server alive, the step already failed its sequences
                log.exception("engine step failed")
                busy = False
            if not busy:
                self._wakeup.wait(timeout=0.005 if self.scheduler.waiting else 0.5)
                self._wakeup.clear()
        self._run_control()

    def _call_on_engine_thread(self, fn) -> None:
        self._control.append(fn)
        self._wakeup.set()
        if self._thread is None:
            self._run_control()

    def _run_control(self) -> None:
        while self._control:
            fn = self._control.popleft()
            try:
                fn()
            except Exception:
                log.exception("engine control operation failed")

    def step(self) -> bool:
        """One scheduling round and, if anything is runnable, one forward. True if work was done."""
        self._run_control()
        self._take_incoming()
        self._reap_cancelled()
        batch = self.scheduler.schedule(self._try_admit)
        if not batch:
            return False
        self.steps_total += 1
        for seq, n in batch:
            self.block_manager.grow(seq.seq_id, seq.block_table, seq.num_computed + n)
        try:
            out = self.runner.run(batch, self.cache.slot_targets())
        except Exception as exc:
            log.exception("forward step failed; failing its %d sequences", len(batch))
            for seq, _ in batch:
                self._finish(seq, StopReason.ERROR, LoraplexError(f"internal error in the forward step: {exc}"))
            return True
        for seq, n in batch:
            seq.num_computed += n
        self.generated_tokens_total += len(out.sampled)
        process_sampled(self, out)
        return True

    def _take_incoming(self) -> None:
        with self._lock:
            while self._incoming:
                seq = self._incoming.popleft()
                self.cache.want([k for need in seq.needs for k in (need.key, *need.depends_on)])
                self.scheduler.add(seq)

    def _reap_cancelled(self) -> None:
        now = time.monotonic()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.handle.cancelled:
                self._finish(seq, StopReason.CANCELLED, Cancelled(f"request {seq.request_id} was cancelled"))
            elif seq.request.deadline is not None and now >= seq.request.deadline:
                self._finish(seq, StopReason.CANCELLED,
                             DeadlineExceeded(f"request {seq.request_id} passed its deadline"))

    def _cancel_all(self) -> None:
        for seq in [*self._incoming, *self.scheduler.waiting, *self.scheduler.running]:
            seq.handle.cancel()
        self._take_incoming()
        self._reap_cancelled()

    def _try_admit(self, seq: Sequence) -> Admission:
        for need in seq.needs:
            states = [self.cache.ensure_host(dep, self._dependency_loader(dep)) for dep in need.depends_on]
            if all(state == READY for state in states):
                states.append(self.cache.ensure_host(need.key, need.loader))
            for state in states:
                if isinstance(state, Exception):
                    error = state if isinstance(state, LoraplexError) else LoraplexError(str(state))
                    self._finish(seq, StopReason.ERROR, error)
                    return Admission.DROPPED
            if any(state != READY for state in states):
                return Admission.SKIP
        if not self.block_manager.can_reserve(seq.budget_tokens):
            return Admission.BLOCK
        keys = [need.key for need in seq.needs]
        if len(set(keys)) > self.cache.slots_possible(keys):  # would wait forever behind pinned slots
            self._finish(seq, StopReason.ERROR, ResourceExhausted(
                f"the request needs {len(set(keys))} adapter slots but other adapters' pins leave "
                f"{self.cache.slots_possible(keys)}; unpin some or raise max_loras", field="adapters"))
            return Admission.DROPPED
        slots = self.cache.acquire(keys) if keys else []
        if slots is None:
            return Admission.BLOCK
        self.block_manager.reserve(seq.seq_id, seq.budget_tokens)
        seq.slots = slots
        return Admission.ADMITTED

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
        return self._disk_loader(entry)

    def _finish(self, seq: Sequence, reason: StopReason, error: Exception | None = None, text: str = "",
                token_ids: list[int] | None = None, logprobs=None) -> None:
        self.scheduler.remove(seq)
        self.block_manager.free(seq.seq_id, seq.block_table)
        if seq.slots:
            self.cache.release(seq.slots)
            seq.slots = []
        self.cache.unwant([k for need in seq.needs for k in (need.key, *need.depends_on)])
        seq.status = SeqStatus.FINISHED
        seq.handle.emit(GenerationChunk(
            request_id=seq.request_id, text=text, token_ids=token_ids or [], logprobs=logprobs or [],
            input_tokens=len(seq.prompt_ids), generated_tokens=len(seq.output_ids), stop_reason=reason,
            seed=seq.seed, adapter_versions=seq.adapter_versions, error=error))
