"""Engine: builds the model, KV cache, runner and the three parts that run it, and is their public face.

    EngineCore       (core.py)             the step loop, admission, the bounded queue
    AdapterManager   (adapter_manager.py)  catalog, tiers, loads, register / pin / load
    OutputProcessor  (output_processor.py) detokenize, stops, logprobs, emit

Callers (the gRPC service, the demo, tests) use this class; it holds no logic of its own beyond
wiring and sizing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..adapters.catalog import AdapterEntry
from ..adapters.types import AdapterWeights
from ..config import EngineConfig
from ..errors import ResourceExhausted
from ..model.embedded import default_cache_dir
from ..model.loader import LoadedModel, load_model
from ..types import GenerationChunk, GenerationRequest, GenerationResult
from .adapter_manager import AdapterManager
from .block_manager import BlockManager
from .core import EngineCore
from .handle import RequestHandle
from .kv_cache import allocate_kv_cache, kv_bytes_per_block
from .output_processor import OutputProcessor
from .requests import RequestLimits, prompt_byte_limit
from .runner import ModelRunner

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config = config or EngineConfig()
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.loaded = loaded or load_model(config.model, cache_dir)
        self.model, self.arch, self.tokenizer = self.loaded.model, self.loaded.arch, self.loaded.tokenizer
        self.device, self.dtype = self.model.device, self.model.dtype
        lora = config.lora
        block_size = config.cache.block_size
        if self.device.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention re-plans every step: ms of CPU each
        self.runner = ModelRunner(self.model, config, self._fit_num_blocks)
        num_blocks = self.runner.num_kv_blocks
        self.block_manager = BlockManager(num_blocks, block_size)
        model_len = min(config.model.max_model_len or self.arch.max_position_embeddings,
                        self.block_manager.capacity * block_size)
        self.limits = RequestLimits(
            max_model_len=model_len, max_new_tokens_limit=config.scheduler.max_new_tokens_limit,
            default_max_new_tokens=config.scheduler.default_max_new_tokens,
            max_top_logprobs=config.scheduler.max_top_logprobs,
            max_adapters_per_request=lora.max_adapters_per_request, vocab_size=self.arch.vocab_size,
            max_prompt_bytes=prompt_byte_limit(model_len, self.tokenizer))
        self.eos_token_ids = frozenset(self.arch.eos_token_ids) | frozenset(
            [self.tokenizer.eos_token_id] if self.tokenizer is not None and self.tokenizer.eos_token_id is not None
            else [])
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids)
        overlap = config.scheduler.overlap_steps
        self.core: EngineCore
        self.adapters = AdapterManager(
            lora, self.arch, self.runner.lora_stacks, self.dtype, self.device, cache_dir / "derived",
            cache_dir / "adapter-images",
            run_on_engine_thread=lambda fn, timeout: self.core.run_on_engine_thread(fn, timeout),
            call_on_engine_thread=lambda fn: self.core.call_on_engine_thread(fn))
        self.core = EngineCore(config, self.runner, self.adapters, self.outputs, self.block_manager, self.tokenizer,
                               self.limits, overlap_steps=self.device.type == "cuda" if overlap is None else overlap)
        self.runner.prepare(model_len)
        log.info("engine ready: %d KV blocks of %d tokens, %d adapter slots of rank %d, max_model_len %d",
                 num_blocks, block_size, self.runner.num_slots, lora.max_lora_rank, model_len)

    def _fit_num_blocks(self, reserved_bytes: int = 0) -> int:
        """KV blocks that fit what memory is left (config.cache.num_blocks wins when set)."""
        block_size = self.config.cache.block_size
        if self.config.cache.num_blocks:
            return self.config.cache.num_blocks
        per_block = kv_bytes_per_block(self.arch, block_size, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * self.config.cache.memory_fraction) - used - reserved_bytes
        else:
            budget = self.config.cache.cpu_cache_bytes
        blocks = budget // per_block
        if blocks < 2:
            raise ResourceExhausted(f"no memory left for the KV cache ({budget} bytes for blocks of {per_block})")
        return int(blocks)

    # ---- adapters ----
    def register_adapter(self, name: str, path: str, pin: bool = False, version: int | None = None) -> AdapterEntry:
        return self.adapters.register(name, path, pin=pin, version=version)

    def register_weights(self, name: str, weights: AdapterWeights, pin: bool = False,
                         version: int | None = None, registered_at: float | None = None) -> AdapterEntry:
        return self.adapters.register_weights(name, weights, pin=pin, version=version, registered_at=registered_at)

    def delete_adapter(self, name: str) -> AdapterEntry:
        return self.adapters.delete(name)

    def pin_adapter(self, name: str, pinned: bool = True) -> AdapterEntry:
        return self.adapters.set_pinned(name, pinned)

    def load_adapter(self, name: str, timeout: float = 60.0) -> AdapterEntry:
        return self.adapters.load(name, timeout)

    def unload_adapter(self, name: str, timeout: float = 60.0) -> AdapterEntry:
        return self.adapters.unload(name, timeout)

    @property
    def catalog(self):
        return self.adapters.catalog

    @property
    def cache(self):
        return self.adapters.cache

    @property
    def mix_reports(self) -> dict:
        return self.adapters.mix_reports

    # ---- requests ----
    def submit(self, request: GenerationRequest,
               listener: Callable[[GenerationChunk], None] | None = None) -> RequestHandle:
        return self.core.submit(request, listener)

    def generate(self, requests: list[GenerationRequest], timeout: float | None = None) -> list[GenerationResult]:
        """Submit all, run them (stepping inline when no engine thread runs), return results in order."""
        handles = [self.submit(r) for r in requests]
        if not self.core.running_thread:
            while not all(h.done for h in handles):
                if not self.step():  # nothing runnable (an adapter loading): let the loader have the GIL
                    self.core.wait_for_work(0.005)
        return [h.result(timeout) for h in handles]

    def step(self) -> bool:
        return self.core.step()

    def wait_for_work(self, timeout: float = 0.005) -> None:
        """After step() returned False (nothing runnable): sleep until something can move, at most `timeout` s.
        A loop stepping the engine inline must call this instead of spinning (see EngineCore.wait_for_work)."""
        self.core.wait_for_work(timeout)

    def run_on_engine_thread(self, fn: Callable, timeout: float = 60.0):
        return self.core.run_on_engine_thread(fn, timeout)

    def start(self) -> None:
        self.core.start()

    def stop(self, grace_seconds: float = 0.0) -> None:
        self.core.stop(grace_seconds)
        self.adapters.close()

    def has_work(self) -> bool:
        return self.core.has_work()

    def adapter_keys_in_use(self, timeout: float = 60.0) -> set[str]:
        """Adapter cache keys that queued or running requests use (their files must stay on disk)."""
        return self.core.run_on_engine_thread(self.core.adapter_keys_in_use, timeout)

    @property
    def accepting(self) -> bool:
        return self.core.accepting

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def steps_total(self) -> int:
        return self.core.steps_total

    @property
    def generated_tokens_total(self) -> int:
        return self.core.generated_tokens_total

    @property
    def num_adapter_slots(self) -> int:
        """Device adapter slots (config.lora.max_loras, or what "auto" resolved to)."""
        return self.runner.num_slots

    # ---- gauges ----
    def queue_depth(self) -> int:
        return self.core.queue_depth()

    def running_batch_size(self) -> int:
        return self.core.running_batch_size()

    def kv_usage(self) -> float:
        """Share of KV blocks in use or promised to running sequences."""
        return self.block_manager.usage
