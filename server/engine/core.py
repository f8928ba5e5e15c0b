"""EngineCore: the step loop, admission and the bounded queue. One thread owns the model.

    submit -> validate, tokenize, resolve adapters -> incoming queue (bounded)
    step   -> control ops (pin, delete) -> cancellations and deadlines -> slot fills that landed -> schedule
              (admission: adapters host-ready, KV blocks, adapter slots, their fills landed) -> launch forward
              + sample
           -> meanwhile, the previous step's tokens: detokenize, stops, emit (OutputProcessor)

Overlapped steps: on a GPU the forward of step n+1 is launched before step n's tokens are read
back, so the host work of one step (output processing, the next inputs) hides behind the device
work of the other. A sequence whose token is still on the device decodes it from the device
buffer (the runner gathers it); one that turns out to have ended wastes one row, whose token is
dropped. Repetition penalties need every token on the host, so such batches run in lockstep.

Slot fills: a sequence whose adapter needs a device slot takes the slot (and starts its fill) when first
considered, then waits in the queue, holding it, until the fill's event has fired; the running batch keeps
stepping meanwhile. Its KV blocks are reserved only when it is admitted.
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Callable, Protocol

from ..adapters.cache import SlotWait
from ..config import EngineConfig
from ..errors import Cancelled, DeadlineExceeded, LoraplexError, ResourceExhausted, Unavailable
from ..types import GenerationChunk, GenerationRequest, StopReason
from .adapter_manager import AdapterManager
from .block_manager import BlockManager
from .handle import RequestHandle
from .output_processor import Finished, OutputProcessor, SampledTokens
from .requests import RequestLimits, tokenize_request, validate_request
from .scheduler import Admission, Scheduler
from .sequence import Sequence, SeqStatus

log = logging.getLogger(__name__)


class PendingStep(Protocol):
    """A launched step; result() waits for its tokens to reach the host."""

    def result(self) -> SampledTokens: ...


class StepRunner(Protocol):
    def launch(self, batch: list[tuple[Sequence, int]]) -> PendingStep: ...

    def release(self, seq: Sequence) -> None:
        """`seq` ended: drop whatever per-sequence state the runner keeps."""


class EngineCore:
    def __init__(self, config: EngineConfig, runner: StepRunner, adapters: AdapterManager,
                 outputs: OutputProcessor, block_manager: BlockManager, tokenizer, limits: RequestLimits,
                 overlap_steps: bool):
        self.config = config
        self.runner, self.adapters, self.outputs = runner, adapters, outputs
        self.block_manager = block_manager
        self.scheduler = Scheduler(config.scheduler)
        self.tokenizer, self.limits = tokenizer, limits
        self.overlap_steps = overlap_steps
        self._lock = threading.Lock()
        self._incoming: collections.deque[Sequence] = collections.deque()
        self._control: collections.deque = collections.deque()
        self._wakeup = threading.Event()
        adapters.filler.on_staged = self._wakeup.set  # a staged fill wakes an idle engine (see wait_for_work)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._accepting = True
        self._next_seq_id = 0
        self._in_flight: PendingStep | None = None
        self.generated_tokens_total = 0
        self.steps_total = 0

    # ---- requests (any thread) ----
    def submit(self, request: GenerationRequest,
               listener: Callable[[GenerationChunk], None] | None = None) -> RequestHandle:
        """Validate and queue; raises InvalidArgument / AdapterNotFound / ResourceExhausted / Unavailable.

        `listener`: called on the engine thread with each chunk instead of queueing it (RequestHandle).
        """
        if not self._accepting:
            raise Unavailable("the engine is shutting down")
        validate_request(request, self.limits)
        prompt_ids = tokenize_request(request, self.tokenizer, self.limits)
        needs, versions = self.adapters.resolve(request)
        max_new = request.stopping.max_new_tokens or self.limits.default_max_new_tokens
        max_new = min(max_new, self.limits.max_model_len - len(prompt_ids))
        request_id = request.request_id or uuid.uuid4().hex
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(64)
        handle = RequestHandle(request_id, listener)
        detokenizer, stop_checker = self.outputs.text_state(request.stopping.stop_sequences)
        with self._lock:
            queued = len(self._incoming) + len(self.scheduler.waiting)
            if queued >= self.config.scheduler.max_waiting:
                raise ResourceExhausted(f"queue full: {queued} requests waiting (max_waiting="
                                        f"{self.config.scheduler.max_waiting}); retry later")
            seq = Sequence(seq_id=self._next_seq_id, request=request, request_id=request_id, prompt_ids=prompt_ids,
                           max_new_tokens=max_new, seed=seed, needs=needs, adapter_versions=versions, handle=handle,
                           detokenizer=detokenizer, stop_checker=stop_checker)
            self._next_seq_id += 1
            self._incoming.append(seq)
        self._wakeup.set()
        return handle

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
        self.call_on_engine_thread(self._cancel_all)
        if self._thread is not None:
            self._stopping.set()
            self._wakeup.set()
            self._thread.join()
            self._thread = None
        else:
            self._run_control()
        self._complete_in_flight()

    @property
    def running_thread(self) -> bool:
        return self._thread is not None

    @property
    def accepting(self) -> bool:
        """False once stop() began: submit() raises Unavailable."""
        return self._accepting

    def has_work(self) -> bool:
        return bool(self._incoming or self.scheduler.has_work() or self._in_flight is not None)

    def wait_for_work(self, timeout: float) -> None:
        """After a step that found nothing to run: sleep (GIL released) until a request, a control operation or a
        slot fill can make progress, at most `timeout` s. A caller stepping in a loop must call this rather than
        spin: a spinning engine thread starves the fills' staging thread of the GIL. Fills still staging set the
        wake-up event when their host copy is done (SlotFiller.on_staged); a fill whose device copy is queued is
        waited for on its event (nothing is in flight then, so no step is held up)."""
        if self._in_flight is None and not self._wakeup.is_set() and self.adapters.wait_fill_copy():
            return  # a fill landed: the next step publishes it and admits its sequences
        self._wakeup.wait(timeout)
        self._wakeup.clear()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self.step()
            except Exception:  # a bug: keep the server alive, the step already failed its sequences
                log.exception("engine step failed")
                busy = False
            if not busy:
                self.wait_for_work(0.005 if self.scheduler.waiting else 0.5)
        self._run_control()

    def call_on_engine_thread(self, fn: Callable[[], None]) -> None:
        self._control.append(fn)
        self._wakeup.set()
        if self._thread is None:
            self._run_control()

    def run_on_engine_thread(self, fn: Callable, timeout: float = 60.0):
        """Run `fn` between steps on the engine thread (inline when none runs); its result or exception."""
        future: Future = Future()

        def call():
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)
        self.call_on_engine_thread(call)
        return future.result(timeout)

    def _run_control(self) -> None:
        while self._control:
            fn = self._control.popleft()
            try:
                fn()
            except Exception:
                log.exception("engine control operation failed")

    def step(self) -> bool:
        """One scheduling round: launch a forward if anything is runnable, and process the previous step's
        tokens (while this one runs, when steps overlap). True if work was done."""
        self._run_control()
        self._take_incoming()
        self._reap_cancelled()
        self.adapters.poll_fills()
        if self._in_flight is not None and not self._may_overlap():
            self._complete_in_flight()
        batch = self.scheduler.schedule(self._try_admit)
        launched = self._launch(batch) if batch else None
        had_in_flight = self._in_flight is not None
        self._complete_in_flight()
        self._in_flight = launched
        if launched is not None and not self.overlap_steps:
            self._complete_in_flight()
        return bool(batch) or had_in_flight

    def _may_overlap(self) -> bool:
        """Building the next step without the in-flight tokens: only if no running row needs them on the host."""
        if not self.overlap_steps:
            return False
        return not any(seq.num_pending and seq.request.sampling.repetition_penalty != 1.0
                       for seq in self.scheduler.running)

    def _launch(self, batch: list[tuple[Sequence, int]]) -> PendingStep | None:
        self.steps_total += 1
        for seq, n in batch:
            self.block_manager.grow(seq.seq_id, seq.block_table, seq.num_computed + n)
        try:
            pending = self.runner.launch(batch)
        except Exception as exc:
            log.exception("forward step failed; failing its %d sequences", len(batch))
            for seq, _ in batch:
                self._finish(Finished(seq, StopReason.ERROR,
                                      error=LoraplexError(f"internal error in the forward step: {exc}")))
            return None
        for seq, n in batch:
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:  # this step samples its next token
                seq.num_pending += 1
        return pending

    def _complete_in_flight(self) -> None:
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return
        try:
            sampled = pending.result()
        except Exception as exc:
            log.exception("reading a step's tokens failed")
            for seq in list(self.scheduler.running):
                self._finish(Finished(seq, StopReason.ERROR,
                                      error=LoraplexError(f"internal error in the forward step: {exc}")))
            return
        for seq in sampled.sequences:
            seq.num_pending -= 1
        self.generated_tokens_total += sum(1 for seq in sampled.sequences if not seq.finished)
        for done in self.outputs.process(sampled):
            self._finish(done)

    def _take_incoming(self) -> None:
        with self._lock:
            while self._incoming:
                seq = self._incoming.popleft()
                self.adapters.cache.want(self.adapters.keys_of(seq))
                self.adapters.host_ready(seq)  # starts host loads now, while it queues (admission reads the state)
                self.scheduler.add(seq)

    def _reap_cancelled(self) -> None:
        now = time.monotonic()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.handle.cancelled:
                self._finish(Finished(seq, StopReason.CANCELLED,
                                      error=Cancelled(f"request {seq.request_id} was cancelled")))
            elif seq.request.deadline is not None and now >= seq.request.deadline:
                self._finish(Finished(seq, StopReason.CANCELLED,
                                      error=DeadlineExceeded(f"request {seq.request_id} passed its deadline")))

    def _cancel_all(self) -> None:
        for seq in [*self._incoming, *self.scheduler.waiting, *self.scheduler.running]:
            seq.handle.cancel()
        self._take_incoming()
        self._reap_cancelled()

    def _try_admit(self, seq: Sequence) -> Admission:
        state = self.adapters.host_ready(seq)
        if isinstance(state, Exception):
            self._finish(Finished(seq, StopReason.ERROR, error=state))
            return Admission.DROPPED
        if state != "ready":
            return Admission.SKIP
        if not self.block_manager.can_reserve(seq.budget_tokens):
            return Admission.BLOCK
        if seq.slots is None:
            slots = self.adapters.acquire_slots(seq)
            if isinstance(slots, Exception):
                self._finish(Finished(seq, StopReason.ERROR, error=slots))
                return Admission.DROPPED
            if slots is SlotWait.SLOTS:
                return Admission.BLOCK  # first come, first served: later sequences wait for slots too
            if slots is SlotWait.STAGING:
                return Admission.SKIP  # a fill must land first; sequences whose adapters are resident go ahead
            seq.slots = slots  # held while the fills land (released on finish or cancel)
        if not self.adapters.fills_landed(seq):
            return Admission.SKIP  # the batch keeps stepping; later sequences may be admitted meanwhile
        self.block_manager.reserve(seq.seq_id, seq.budget_tokens)
        return Admission.ADMITTED

    def _finish(self, done: Finished) -> None:
        """Free a sequence's KV blocks and adapter slots and emit its last chunk (idempotent per sequence)."""
        seq = done.seq
        if seq.finished:
            return
        self.scheduler.remove(seq)
        self.block_manager.free(seq.seq_id, seq.block_table)
        self.adapters.release(seq)
        self.runner.release(seq)
        seq.status = SeqStatus.FINISHED
        seq.handle.emit(self.outputs.final_chunk(done))

    def adapter_keys_in_use(self) -> set[str]:
        """Engine thread: cache keys of every queued or running request's adapters."""
        with self._lock:
            seqs = [*self._incoming, *self.scheduler.waiting, *self.scheduler.running]
        return {key for seq in seqs for key in self.adapters.keys_of(seq)}

    # ---- gauges (read from any thread, e.g. by the metrics collector) ----
    def queue_depth(self) -> int:
        """Requests submitted but not yet running."""
        return len(self._incoming) + len(self.scheduler.waiting)

    def running_batch_size(self) -> int:
        return len(self.scheduler.running)
