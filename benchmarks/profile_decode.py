"""Where a decode step's time goes on the GPU: torch.profiler over a few steps of the bench engine.

    python benchmarks/profile_decode.py --batch 32 --mode distinct
"""
from __future__ import annotations

import argparse
import time

import torch

from loraplex.server.bench.serving import ServeBenchConfig, _requests, build_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="benchmarks/shapes/llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mode", default="distinct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    args = parser.parse_args()
    cfg = ServeBenchConfig(model=args.model, batches=(args.batch,), num_adapters=args.batch, new_tokens=64,
                           enforce_eager=args.eager)
    engine = build_engine(cfg)
    for mode in args.mode.split(","):
        handles = [engine.submit(r) for r in _requests(cfg, engine.arch.vocab_size, args.batch, mode, 64, seed=3)]
        for _ in range(4):  # prefill + warm decode steps
            engine.step()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - started) * 100
        print(f"== {mode} batch {args.batch}: {step_ms:.1f} ms per decode step "
              f"({args.batch * 1000 / step_ms:.0f} tok/s)", flush=True)
        if not args.profile:
            for h in handles:
                h.cancel()
            while engine.has_work():
                engine.step()
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60)
        print(table)
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60)
        print(table)
        for h in handles:
            h.cancel()
        while engine.has_work():
            engine.step()
    engine.stop()


if __name__ == "__main__":
    main()
