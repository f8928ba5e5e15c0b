"""Our engine under the benchmark's load: random-weight base, random r-rank all-linear adapters.

Adapters are made in memory (no files: 64 Llama-8B-shaped r16 adapters would be 5 GB of disk) and
registered through the same validation as folders. Every row gets a random prompt of exactly
prompt_len tokens and generates exactly new_tokens (ignore_eos), greedy, like the PEFT baseline.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..adapters.types import AdapterWeights, ModuleLoRA
from ..config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from ..engine.engine import Engine
from ..model.arch import LINEAR_MODULES, ModelArch
from ..types import GenerationRequest, SamplingParams, StoppingCriteria

MODES = ("base", "shared", "distinct")


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    model: str
    """Folder with config.json (weights too unless load_format is dummy)."""
    load_format: str = "dummy"
    quantization: str = "nf4"
    dtype: str = "bfloat16"
    device: str = "cuda"
    batches: tuple[int, ...] = (1, 8, 32, 64)
    modes: tuple[str, ...] = MODES
    prompt_len: int = 128
    """Prompt length of the rows (run_serving_bench takes a list of lengths: one engine serves them all)."""
    new_tokens: int = 64
    max_batched_tokens: int = 8192
    """Per-step token budget (chunked prefill above it)."""
    rank: int = 16
    alpha: float = 32.0
    num_adapters: int = 64
    seed: int = 0
    enforce_eager: bool = False
    staging_bytes: int | None = None
    """Pinned staging pool for slot fills (None: LoRAConfig's default)."""
    staged_fills: bool | None = None
    """LoRAConfig.staged_fills (True on the CPU: the GPU's fill path, for tests)."""


def random_adapter(arch: ModelArch, name: str, rank: int, alpha: float, gen: torch.Generator,
                   device: str) -> AdapterWeights:
    """All-linear LoRA with non-zero A and B, built on `device`, kept on the CPU like a loaded file."""
    modules = {}
    for layer in range(arch.num_layers):
        for module in LINEAR_MODULES:
            n_in, n_out = arch.linear_shape(module)
            a = torch.randn(rank, n_in, generator=gen, device=device, dtype=torch.bfloat16) / n_in ** 0.5
            b = torch.randn(n_out, rank, generator=gen, device=device, dtype=torch.bfloat16) * 0.01
            modules[(layer, module)] = ModuleLoRA(a=a.cpu(), b=b.cpu(), scale=alpha / rank)
    return AdapterWeights(name=name, modules=modules, source="memory:random", sha256=f"random-{name}")


def build_engine(cfg: ServeBenchConfig, prompt_lens: tuple[int, ...] | None = None) -> Engine:
    max_batch = max(cfg.batches)
    tokens_per_seq = max(prompt_lens or (cfg.prompt_len,)) + cfg.new_tokens
    block_size = 16
    num_blocks = max_batch * (-(-tokens_per_seq // block_size)) + 64
    config = EngineConfig(
        model=ModelConfig(path=cfg.model, quantization=cfg.quantization, dtype=cfg.dtype, device=cfg.device,
                          load_format=cfg.load_format, seed=cfg.seed, enforce_eager=cfg.enforce_eager),
        lora=LoRAConfig(max_lora_rank=cfg.rank, max_loras=max(cfg.num_adapters, 1),
                        max_cpu_loras=max(cfg.num_adapters, 1), max_adapters_per_request=1, derived_rank=cfg.rank,
                        staged_fills=cfg.staged_fills,
                        **({} if cfg.staging_bytes is None else {"staging_bytes": cfg.staging_bytes})),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=cfg.max_batched_tokens,
                                  max_waiting=4 * max_batch, max_new_tokens_limit=cfg.new_tokens,
                                  default_max_new_tokens=cfg.new_tokens))
    engine = Engine(config)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
    for i in range(cfg.num_adapters):
        engine.register_weights(f"a{i}", random_adapter(engine.arch, f"a{i}", cfg.rank, cfg.alpha, gen, cfg.device))
    return engine


def _requests(cfg: ServeBenchConfig, vocab_size: int, batch: int, mode: str, new_tokens: int, seed: int,
              prompt_len: int):
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).tolist()
    adapters = {"base": lambda i: "", "shared": lambda i: "a0", "distinct": lambda i: f"a{i}"}[mode]
    return [GenerationRequest(prompt_token_ids=tuple(p), adapter=adapters(i), sampling=SamplingParams(seed=i),
                              stopping=StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True))
            for i, p in enumerate(prompts)]


def _timed(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, list[list[float]]]:
    """Submit all at once, step until done; (start time, per request the arrival time of each chunk)."""
    arrivals: list[list[float]] = [[] for _ in requests]
    handles = []
    started = time.perf_counter()
    for i, request in enumerate(requests):
        handles.append(engine.submit(request, listener=lambda chunk, i=i: arrivals[i].append(time.perf_counter())))
    while not all(h.done for h in handles):
        if not engine.step():  # nothing runnable (fills landing): sleep, never spin against the staging thread
            engine.wait_for_work()
    return started, arrivals


def run_one(engine: Engine, cfg: ServeBenchConfig, batch: int, mode: str, prompt_len: int | None = None) -> dict:
    """Warm up (shapes, adapter slots, graphs), then time one full batch from submit to last token.

    The warm-up repeats until one ran without a slot fill: a warm-up whose adapters had to be filled admits its
    rows a few at a time, as their fills land, so it never runs the full batch's shapes (the 4096-token LoRA
    prefill, the batch-32 LoRA decode graph) and the timed batch would pay their compiles and graph capture in
    its TTFT. The row reports what the timed batch still did for the first time (`timed_fills`,
    `timed_new_shapes`: both 0 in a fair row).

    tokens_per_s: generated tokens over the wall time (prefill included); ttft: submit to first token;
    decode_step_ms: mean gap between a request's tokens after its first; decode_tokens_per_s: the batch
    over that gap (the rate once prompts are in)."""
    prompt_len = prompt_len or cfg.prompt_len
    if mode == "distinct" and batch > cfg.num_adapters:
        raise ValueError(f"distinct at batch {batch} needs {batch} adapters, have {cfg.num_adapters}")
    vocab = engine.arch.vocab_size
    warm_up = _requests(cfg, vocab, batch, mode, 4, seed=1, prompt_len=prompt_len)
    for _ in range(3):
        installs = engine.cache.stats.installs
        engine.generate(warm_up)
        if engine.cache.stats.installs == installs:  # every adapter was resident: the batch ran whole
            break
    _sync(cfg.device)
    shapes_before = set(engine.runner.step_shapes)
    installs_before = engine.cache.stats.installs
    requests = _requests(cfg, vocab, batch, mode, cfg.new_tokens, seed=2, prompt_len=prompt_len)
    steps_before = engine.steps_total
    tokens_before = engine.generated_tokens_total
    started, arrivals = _timed(engine, requests)
    _sync(cfg.device)
    wall = time.perf_counter() - started
    timed_fills = engine.cache.stats.installs - installs_before
    new_shapes = sorted(engine.runner.step_shapes - shapes_before)
    if timed_fills or new_shapes:
        logging.getLogger(__name__).warning("%s batch %d: the timed batch ran %d slot fills and new step shapes %s "
                                            "(their cost is in its TTFT)", mode, batch, timed_fills, new_shapes)
    generated = engine.generated_tokens_total - tokens_before
    assert generated == batch * cfg.new_tokens, f"generated {generated}, expected {batch * cfg.new_tokens}"
    ttfts = sorted(times[0] - started for times in arrivals)
    gaps = [(times[-1] - times[0]) / (len(times) - 1) for times in arrivals if len(times) > 1]
    step_s = sum(gaps) / len(gaps) if gaps else float("nan")
    return {"system": "loraplex", "mode": mode, "batch_size": batch, "prompt_len": prompt_len,
            "new_tokens": cfg.new_tokens, "generated_tokens": generated, "wall_s": round(wall, 4),
            "tokens_per_s": round(generated / wall, 2),
            "total_tokens_per_s": round(batch * (prompt_len + cfg.new_tokens) / wall, 1),
            "ttft_ms_mean": round(1000 * sum(ttfts) / len(ttfts), 2), "ttft_ms_max": round(1000 * ttfts[-1], 2),
            "decode_step_ms": round(1000 * step_s, 3), "decode_tokens_per_s": round(batch / step_s, 1),
            "steps": engine.steps_total - steps_before, "timed_fills": timed_fills,
            "timed_new_shapes": len(new_shapes)}


def run_serving_bench(cfg: ServeBenchConfig, log=print, prompt_lens: tuple[int, ...] | None = None) -> list[dict]:
    prompt_lens = prompt_lens or (cfg.prompt_len,)
    engine = build_engine(cfg, prompt_lens)
    results = []
    try:
        for prompt_len in prompt_lens:
            for mode in cfg.modes:
                for batch in cfg.batches:
                    if mode == "distinct" and batch > cfg.num_adapters:
                        continue
                    row = run_one(engine, cfg, batch, mode, prompt_len)
                    log(f"loraplex prompt {prompt_len:5d} {mode:8s} batch {batch:3d}: {row['tokens_per_s']:9.1f} tok/s "
                        f"(decode {row['decode_tokens_per_s']:8.1f} tok/s, {row['decode_step_ms']:.2f} ms/step, "
                        f"TTFT mean {row['ttft_ms_mean']:.1f} ms, {row['wall_s']:.2f} s, {row['steps']} steps)")
                    results.append(row)
    finally:
        engine.stop()
        del engine
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
