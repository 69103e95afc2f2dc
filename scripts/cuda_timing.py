"""The GPU time of one call, shared by the kernel benchmarks: median of CUDA-event timings after a warm-up."""
from __future__ import annotations

import torch


def median_seconds(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median over `iters` calls of fn's GPU time in seconds, each call timed by its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]
