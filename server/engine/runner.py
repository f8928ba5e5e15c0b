"""ModelRunner: turns a scheduled step into model inputs, launches the forward and the sampler, and
hands back a PendingStep whose tokens arrive with one device-to-host copy.

Nothing here waits for the device: `launch` returns as soon as the work is queued, so the engine
core can process the previous step's tokens meanwhile. A token sampled by a step still in flight
is read on the device (`StepInputBuilder` gathers it from that step's output buffer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import record_function

from ..buckets import batch_bucket
from ..config import EngineConfig
from ..lora.slot_budget import CPU_SLOTS, log_auto_slots, slots_that_fit
from ..lora.stacks import LoraStacks
from ..model.llama import CausalLM
from .graphs import DecodeGraphs
from .kv_cache import allocate_kv_cache
from .output_processor import SampledTokens
from .sampler import RowSampling, build_sampling_tensors, sample
from .sequence import Sequence
from .step_inputs import StepInputBuilder


@dataclass(slots=True)
class DeviceTokens:
    """A launched step's sampled tokens (and logprobs) on their way to the host."""

    sequences: list[Sequence]
    packed: torch.Tensor
    """Host tensor (pinned on CUDA) filled by one non_blocking copy: ids, then logprob fields if wanted."""
    event: torch.cuda.Event | None
    num_logprobs: int
    want_logprobs: bool

    def result(self) -> SampledTokens:
        if self.event is not None:
            self.event.synchronize()
        n, k = len(self.sequences), self.num_logprobs
        if n == 0:
            return SampledTokens(sequences=[], token_ids=[])
        values = self.packed.tolist()
        token_ids = [int(v) for v in values[:n]]
        if not self.want_logprobs:
            return SampledTokens(sequences=self.sequences, token_ids=token_ids)
        logprobs = values[n:2 * n]
        top_ids = top_logprobs = None
        if k:
            flat_ids = values[2 * n:2 * n + n * k]
            flat_lp = values[2 * n + n * k:2 * n + 2 * n * k]
            top_ids = [[int(v) for v in flat_ids[i * k:(i + 1) * k]] for i in range(n)]
            top_logprobs = [flat_lp[i * k:(i + 1) * k] for i in range(n)]
        return SampledTokens(sequences=self.sequences, token_ids=token_ids, logprobs=logprobs, top_ids=top_ids,
                             top_logprobs=top_logprobs)


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig, fit_num_blocks: Callable[[int], int]):
        self.model, self.config = model, config
        self.device, self.dtype = model.device, model.dtype
        self.block_size = config.cache.block_size
        if config.lora.max_loras == "auto":  # the KV cache first, then as many slots as the rest holds
            self._allocate_kv(fit_num_blocks)
            self.lora_stacks = self._stacks(self._auto_num_slots())
        else:  # the slots first, the KV cache fits what is left
            self.lora_stacks = self._stacks(config.lora.max_loras)
            self._allocate_kv(fit_num_blocks)
        self.inputs: StepInputBuilder | None = None
        self.graphs: DecodeGraphs | None = None
        self.step_shapes: set[tuple[str, int, str]] = set()
        """Every step shape launched so far: ('decode', batch bucket, LoRA kind) or ('prefill', token bucket, LoRA
        kind). A shape's first step pays the kernels' compiles and, on a GPU, its decode graph's capture: a
        benchmark's warm-up must have run every shape its timed batch runs (bench.serving checks it)."""

    def _stacks(self, num_slots: int) -> LoraStacks:
        return LoraStacks(self.model.group_shapes(), num_slots, self.config.lora.max_lora_rank, self.dtype,
                          self.device)

    def _allocate_kv(self, fit_num_blocks: Callable[[int], int]) -> None:
        self.num_kv_blocks = fit_num_blocks(0)
        self.kv_caches = allocate_kv_cache(self.model.arch, self.num_kv_blocks, self.block_size, self.dtype,
                                           self.device)

    def _auto_num_slots(self) -> int:
        """--max-loras auto: slots for the GPU memory left after the model and KV cache, less the margin."""
        lora = self.config.lora
        if self.device.type != "cuda":
            return max(min(CPU_SLOTS, lora.max_cpu_loras), lora.max_adapters_per_request)
        per_slot = self._stacks(1).bytes_per_slot
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # cached
        slots = slots_that_fit(free, per_slot, lora.slot_memory_margin, lora.max_adapters_per_request,
                               lora.max_cpu_loras)
        log_auto_slots(slots, free, per_slot, lora.slot_memory_margin, lora.max_cpu_loras)
        return slots

    @property
    def num_slots(self) -> int:
        return self.lora_stacks.num_slots

    def prepare(self, max_model_len: int) -> None:
        """Size the step buffers for `max_model_len`; decode graphs (captured lazily per batch bucket) on a GPU."""
        sched = self.config.scheduler
        self.inputs = StepInputBuilder(self.model, self.kv_caches, self.lora_stacks, self.block_size,
                                       sched.max_num_seqs, sched.max_num_batched_tokens, max_model_len,
                                       self.config.lora.max_adapters_per_request)
        if self.device.type == "cuda" and not self.config.model.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.inputs, sched.max_num_seqs)

    def launch(self, batch: list[tuple[Sequence, int]]) -> DeviceTokens:
        pad_to = None
        if self.graphs is not None and all(n == 1 for _, n in batch):
            pad_to = self.graphs.bucket_for(len(batch))
        with record_function("prepare"):
            step = self.inputs.build(batch, pad_to=pad_to)
        if step.decode_only:
            self.step_shapes.add(("decode", pad_to or batch_bucket(step.num_seqs), step.lora_kind))
        else:
            self.step_shapes.add(("prefill", 1 << (step.input_ids.shape[0] - 1).bit_length(), step.lora_kind))
        if pad_to is not None:
            with record_function("graph"):
                logits = self.graphs.run(step)
        else:
            with record_function("forward"):
                logits = self.model(step.input_ids, step.context)
        if not step.sampled:
            return DeviceTokens(sequences=[], packed=torch.empty(0), event=None, num_logprobs=0,
                                want_logprobs=False)
        with record_function("sample"):
            return self._sample(logits, step.sampled)

    def _sample(self, logits: torch.Tensor, sampled: list[Sequence]) -> DeviceTokens:
        rows = [self._row(seq) for seq in sampled]
        out = sample(logits, build_sampling_tensors(rows, self.device))
        self.inputs.record_sampled(sampled, out.token_ids)
        want_logprobs = any(seq.request.top_logprobs > 0 for seq in sampled)
        num_logprobs = out.top_ids.shape[1] if want_logprobs and out.top_ids is not None else 0
        if want_logprobs:
            parts = [out.token_ids.double(), out.logprobs.double()]
            if num_logprobs:
                parts += [out.top_ids.double().flatten(), out.top_logprobs.double().flatten()]
            packed = torch.cat(parts)
        else:
            packed = out.token_ids
        event = None
        if self.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            packed = host
        return DeviceTokens(sequences=sampled, packed=packed, event=event, num_logprobs=num_logprobs,
                            want_logprobs=want_logprobs)

    def release(self, seq: Sequence) -> None:
        """A sequence ended: forget its per-sequence input state."""
        self.inputs.release(seq)

    @staticmethod
    def _row(seq: Sequence) -> RowSampling:
        params = seq.request.sampling
        penalty_ids = seq.prompt_ids + seq.output_ids if params.repetition_penalty != 1.0 else ()
        return RowSampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                           repetition_penalty=params.repetition_penalty, seed=seq.seed, step=seq.num_generated,
                           penalty_token_ids=penalty_ids, num_logprobs=seq.request.top_logprobs)
