"""Where a decode step's time goes on the GPU: step wall time, graph replay time, and a torch.profiler
kernel table of the same step run eagerly.

    python benchmarks/profile_decode.py --batch 32 --modes base,shared,distinct [--profile]
    python benchmarks/profile_decode.py --ttft --modes base,shared     # one 128-token prefill: host vs GPU time
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from loraplex.server.bench.serving import ServeBenchConfig, _requests, build_engine


def _drain(engine, handles) -> None:
    for h in handles:
        h.cancel()
    while engine.has_work():
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="benchmarks/shapes/llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", default="base,shared,distinct")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="also print a kernel table of eager steps")
    parser.add_argument("--ttft", action="store_true", help="profile one request's prefill step instead")
    args = parser.parse_args()
    if args.ttft:
        return profile_prefill(args)
    cfg = ServeBenchConfig(model=args.model, batches=(args.batch,), num_adapters=args.batch, new_tokens=256,
                           prompt_len=args.prompt_len)
    engine = build_engine(cfg)
    graphs = engine.runner.graphs
    for mode in args.modes.split(","):
        requests = _requests(cfg, engine.arch.vocab_size, args.batch, mode, 256, seed=3, prompt_len=args.prompt_len)
        handles = [engine.submit(r) for r in requests]
        for _ in range(6):  # prefill + graph capture + warm decode steps
            engine.step()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - started) * 50
        line = f"== {mode} batch {args.batch}: {step_ms:.2f} ms per decode step ({args.batch * 1000 / step_ms:.0f} tok/s)"
        if graphs is not None and graphs.graphs:
            key = max(graphs.graphs, key=lambda k: (k[0] == graphs.bucket_for(args.batch), k))
            graph = graphs.graphs[key]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            line += f"; graph {key} replay {start.elapsed_time(end) / 20:.2f} ms"
        print(line, flush=True)
        if args.profile:
            engine.runner.graphs = None  # the same steps, eagerly, so the profiler sees every kernel
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    engine.step()
                torch.cuda.synchronize()
            engine.runner.graphs = graphs
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60))
        _drain(engine, handles)
    engine.stop()


def profile_prefill(args) -> None:
    """One request's first step (what TTFT waits for): wall time, the GPU's busy time, the top host and device
    ops. A wall time far above the GPU's time means the step is host-bound (launches, Python, syncs)."""
    cfg = ServeBenchConfig(model=args.model, batches=(1,), num_adapters=2, new_tokens=4, prompt_len=args.prompt_len)
    engine = build_engine(cfg)
    for mode in args.modes.split(","):
        for attempt in range(3):  # the first two warm the caches and compile; the third is profiled
            request = _requests(cfg, engine.arch.vocab_size, 1, mode, 4, seed=attempt, prompt_len=args.prompt_len)[0]
            torch.cuda.synchronize()
            handle = engine.submit(request)
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            profiler = (torch.profiler.profile(activities=activities) if attempt == 2
                        else contextlib.nullcontext())  # (torch 2.11's profile() takes no `enabled`)
            with profiler as prof:
                started = time.perf_counter()
                engine.step()
                torch.cuda.synchronize()
                wall_ms = (time.perf_counter() - started) * 1000
            _drain(engine, [handle])
        events = prof.key_averages()
        gpu_ms = sum(e.self_device_time_total for e in events) / 1000
        print(f"== prefill {mode} prompt {args.prompt_len}: step {wall_ms:.1f} ms, GPU busy {gpu_ms:.1f} ms, "
              f"{sum(e.count for e in events if e.self_device_time_total > 0)} kernels", flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    engine.stop()


if __name__ == "__main__":
    main()
