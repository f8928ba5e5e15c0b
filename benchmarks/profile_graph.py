"""GPU time inside a decode graph: run its captured computation eagerly under torch.profiler.

    python benchmarks/profile_graph.py --batch 32
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
    args = parser.parse_args()
    cfg = ServeBenchConfig(model=args.model, batches=(args.batch,), num_adapters=args.batch, new_tokens=64)
    engine = build_engine(cfg)
    handles = [engine.submit(r) for r in _requests(cfg, engine.arch.vocab_size, args.batch, "distinct", 64, 3)]
    for _ in range(4):
        engine.step()
    graphs = engine.runner.graphs
    for key, graph in graphs.graphs.items():
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        print(f"graph {key}: {(time.perf_counter() - started) * 100:.2f} ms per replay", flush=True)
    b, c, _ = next(iter(graphs.graphs))
    for with_lora in (0, 1, graphs.num_slots):
        for _ in range(2):
            graphs._forward(b, c, with_lora)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                graphs._forward(b, c, with_lora)
            torch.cuda.synchronize()
        print(f"== eager run of the graph's computation, adapters={with_lora} (3 steps)")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=70))
    for h in handles:
        h.cancel()
    engine.stop()


if __name__ == "__main__":
    main()
