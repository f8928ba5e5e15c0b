"""GPU timing for tuning and benchmarks: median time per call, inputs rotated so the L2 cannot serve them."""
from __future__ import annotations

import statistics
from typing import Callable

import torch


def rotations(bytes_per_call: int, device: torch.device | str = "cuda", cap: int = 64) -> int:
    """How many distinct input sets to cycle through so their bytes exceed 3x the device's L2 (at least 2)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(cap, -(-3 * l2 // max(1, bytes_per_call))))


def time_per_call_us(fn: Callable[[int], object], n_inputs: int, min_calls: int = 24, replays: int = 5,
                     graph: bool = True) -> tuple[float, str]:
    """(median microseconds per call, "graph" | "eager") of fn(i), i cycling over range(n_inputs).

    With graph=True the calls are captured once into a CUDA graph and replayed (no launch overhead, like the
    decode path); when capture fails it falls back to eager launches timed with CUDA events.
    """
    calls = max(min_calls, n_inputs)
    for i in range(n_inputs):  # compile, warm the allocator
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    mode = "eager"

    def eager() -> None:
        for c in range(calls):
            fn(c % n_inputs)

    run: Callable[[], object] = eager
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for c in range(calls):
                    fn(c % n_inputs)
            g.replay()
            torch.cuda.synchronize()
            run, mode = g.replay, "graph"  # noqa: F811
        except Exception:  # noqa: BLE001 - a library that cannot be captured is timed eagerly
            torch.cuda.synchronize()
    if mode == "eager":
        run()
    times = []
    for _ in range(replays):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times), mode


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device: torch.device | str = "cuda") -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written, over time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us, _ = time_per_call_us(lambda i: dst.copy_(src), 1, min_calls=10, replays=5, graph=False)
    return 2 * nbytes / (us * 1e-6) / 1e9
