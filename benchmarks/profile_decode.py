"""Where a decode step's time goes on the GPU: step wall time, graph replay time, and a torch.profiler
kernel table of the same step run eagerly.

    python benchmarks/profile_decode.py --batch 32 --modes base,shared,distinct [--profile]
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args()
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
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
        _drain(engine, handles)
    engine.stop()


if __name__ == "__main__":
    main()
