"""`loraplex bench adapters`: many adapters under skewed, open-loop traffic, as ops teams run them.

Requests arrive by a Poisson process at a fixed rate (open loop: arrivals never wait for completions), each
for one adapter drawn from a Zipf(s) popularity over N adapters (rank k has weight 1 / k^s; which adapter is
rank k is a seeded shuffle), with prompt and output lengths drawn from log-normal distributions clipped to
realistic ranges. Adapters are real PEFT folders on disk (written once per shape into `adapters_dir`, then
reused) and are registered through the same validation as any folder, so host misses read what a server
reads. Device slots and the host tier are bounded (`max_loras`, `max_cpu_loras`): with N above them, traffic
causes loads and evictions while others decode.

Reported per N: tokens/s and requests/s over the run, TTFT and TPOT p50/p99, the longest gap between two
tokens of one request (what a running request feels while others' adapters load), host load latency
p50/p99, host and device hit rates, peak GPU memory and host-tier bytes.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from ..engine.engine import Engine
from ..model.arch import ModelArch
from ..types import GenerationChunk, GenerationRequest, SamplingParams, StoppingCriteria


@dataclass(frozen=True, slots=True)
class AdapterTrafficConfig:
    model: str = "benchmarks/shapes/llama-3.1-8b"
    load_format: str = "dummy"
    quantization: str = "nf4"
    dtype: str = "bfloat16"
    device: str = "cuda"
    num_adapters: tuple[int, ...] = (8, 64, 1000)
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    rate: float = 8.0
    """Requests per second (Poisson)."""
    duration_s: float = 60.0
    """Arrivals are drawn over this long; the run ends when the last request finishes."""
    zipf_s: float = 1.0
    prompt_len: tuple[int, int, int] = (256, 32, 2048)
    """Median, min, max of the log-normal prompt length (sigma 0.8)."""
    output_len: tuple[int, int, int] = (128, 16, 512)
    """Median, min, max of the log-normal output length (sigma 0.6)."""
    max_loras: int = 32
    max_cpu_loras: int = 128
    max_num_seqs: int = 64
    max_batched_tokens: int = 4096
    kv_tokens: int = 200_000
    adapters_dir: str = "benchmarks/adapters-cache"
    seed: int = 0
    enforce_eager: bool = False


@dataclass(slots=True)
class _Trace:
    """One request's clock: arrival, every token's time, and how it ended."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


def write_adapters(arch: ModelArch, count: int, rank: int, targets: tuple[str, ...], root: Path,
                   seed: int) -> list[Path]:
    """`count` PEFT folders of random rank-`rank` adapters on `targets` (kept across runs: files are reused)."""
    shape = f"{arch.num_layers}x{arch.hidden_size}-r{rank}-{'-'.join(targets)}"
    folders = []
    for i in range(count):
        folder = root / shape / f"adapter{i:05d}"
        if not (folder / "adapter_model.safetensors").is_file():
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            tensors = {}
            for layer in range(arch.num_layers):
                for module in targets:
                    n_in, n_out = arch.linear_shape(module)
                    prefix = f"base_model.model.{arch.module_path(layer, module)}"
                    tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, n_in, generator=gen) / n_in ** 0.5).to(
                        torch.bfloat16)
                    tensors[f"{prefix}.lora_B.weight"] = (torch.randn(n_out, rank, generator=gen) * 0.01).to(
                        torch.bfloat16)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_config.json").write_text(json.dumps(
                {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                 "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none"}))
            save_file(tensors, str(folder / "adapter_model.safetensors"))
        folders.append(folder)
    return folders


def build_engine(cfg: AdapterTrafficConfig) -> Engine:
    block_size = 16
    return Engine(EngineConfig(
        model=ModelConfig(path=cfg.model, quantization=cfg.quantization, dtype=cfg.dtype, device=cfg.device,
                          load_format=cfg.load_format, seed=cfg.seed, enforce_eager=cfg.enforce_eager),
        lora=LoRAConfig(max_lora_rank=cfg.rank, max_loras=cfg.max_loras, max_cpu_loras=cfg.max_cpu_loras,
                        max_adapters_per_request=1, derived_rank=cfg.rank),
        cache=CacheConfig(block_size=block_size, num_blocks=-(-cfg.kv_tokens // block_size)),
        scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_batched_tokens,
                                  max_waiting=100_000, max_new_tokens_limit=cfg.output_len[2],
                                  default_max_new_tokens=cfg.output_len[0])))


def workload(cfg: AdapterTrafficConfig, num_adapters: int, vocab_size: int) -> list[tuple[float, int, list[int], int]]:
    """(arrival offset s, adapter index, prompt token ids, output tokens) per request, seeded."""
    rng = np.random.default_rng(cfg.seed)
    n = max(1, int(rng.poisson(cfg.rate * cfg.duration_s)))
    arrivals = np.sort(rng.uniform(0.0, cfg.duration_s, n))
    weights = 1.0 / np.arange(1, num_adapters + 1) ** cfg.zipf_s
    ranks = rng.choice(num_adapters, size=n, p=weights / weights.sum())
    which = rng.permutation(num_adapters)[ranks]

    def lengths(median_min_max, sigma):
        median, low, high = median_min_max
        return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), low, high).astype(int)

    prompts, outputs = lengths(cfg.prompt_len, 0.8), lengths(cfg.output_len, 0.6)
    return [(float(arrivals[i]), int(which[i]), rng.integers(0, vocab_size, int(prompts[i])).tolist(),
             int(outputs[i])) for i in range(n)]


def run_traffic(engine: Engine, cfg: AdapterTrafficConfig, names: list[str], log=print) -> dict:
    """Drive one workload over the registered adapters `names` on a running engine; the row's figures."""
    requests = workload(cfg, len(names), engine.arch.vocab_size)
    stats = engine.cache.stats
    before = (stats.hits, stats.installs, stats.misses, len(engine.cache.load_seconds()))
    traces: list[_Trace] = []
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    for offset, index, prompt, out_len in requests:
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        trace = _Trace(arrival=time.monotonic())
        traces.append(trace)
        request = GenerationRequest(prompt_token_ids=tuple(prompt), adapter=names[index],
                                    sampling=SamplingParams(seed=len(traces)),
                                    stopping=StoppingCriteria(max_new_tokens=out_len, ignore_eos=True))
        engine.submit(request, _listener(trace))
    for trace in traces:
        trace.done.wait()
    wall = time.monotonic() - start
    errors = [t.error for t in traces if t.error]
    ok = [t for t in traces if not t.error and t.token_times]
    ttft = [t.token_times[0] - t.arrival for t in ok]
    tpot = [(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1) for t in ok if len(t.token_times) > 1]
    gaps = [max(np.diff(t.token_times)) for t in ok if len(t.token_times) > 1]
    loads = engine.cache.load_seconds()[before[3]:]
    hits, installs, misses = stats.hits - before[0], stats.installs - before[1], stats.misses - before[2]
    tokens = sum(len(t.token_times) for t in ok)
    row = {"num_adapters": len(names), "requests": len(traces), "errors": len(errors),
           "first_error": errors[0] if errors else None, "wall_s": round(wall, 3),
           "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(ok) / wall, 2),
           "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot), "max_token_gap_ms": _percentiles(gaps),
           "load_ms": _percentiles(loads), "host_loads": len(loads),
           "host_hit_rate": round(1 - misses / len(traces), 4) if traces else None,
           "device_hit_rate": round(hits / (hits + installs), 4) if hits + installs else None,
           "host_tier_bytes": engine.cache.host_bytes(),
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cfg.device.startswith("cuda") else None}
    log(f"loraplex adapters {len(names):5d}: {row['tokens_per_s']:8.1f} tok/s, {row['requests_per_s']:6.2f} req/s, "
        f"TTFT p50 {row['ttft_ms']['p50']} ms p99 {row['ttft_ms']['p99']} ms, TPOT p99 {row['tpot_ms']['p99']} ms, "
        f"loads {len(loads)} (p99 {row['load_ms']['p99']} ms), hit rate host {row['host_hit_rate']} "
        f"device {row['device_hit_rate']}, errors {len(errors)}")
    return row


def run_adapter_traffic_bench(cfg: AdapterTrafficConfig, log=print) -> list[dict]:
    """One engine per N (fresh tiers); rows in the order of cfg.num_adapters."""
    rows = []
    for count in cfg.num_adapters:
        engine = build_engine(cfg)
        try:
            folders = write_adapters(engine.arch, count, cfg.rank, cfg.targets, Path(cfg.adapters_dir), cfg.seed)
            started = time.monotonic()
            names = []
            for i, folder in enumerate(folders):
                names.append(f"t{i:05d}")
                engine.register_adapter(names[-1], str(folder))
            register_s = time.monotonic() - started
            engine.start()
            row = run_traffic(engine, cfg, names, log)
            row["register_ms_mean"] = round(1000 * register_s / max(count, 1), 2)
            rows.append(row)
        finally:
            engine.stop()
    return rows


def _listener(trace: _Trace):
    def on_chunk(chunk: GenerationChunk) -> None:  # engine thread
        now = time.monotonic()
        trace.token_times.extend([now] * len(chunk.token_ids))
        if chunk.finished:
            if chunk.error is not None:
                trace.error = f"{type(chunk.error).__name__}: {chunk.error}"
            trace.done.set()
    return on_chunk


def _percentiles(values) -> dict:
    if not len(values):
        return {"p50": None, "p99": None, "max": None}
    ms = np.asarray(values, dtype=float) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2)}
