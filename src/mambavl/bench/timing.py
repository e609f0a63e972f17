"""Timing shared by our measurements and the peers': synchronise the GPU around each call, warm up first,
take the median of the repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | None = None) -> None:
    """Waits for the GPU (the given device, or the current one once CUDA is in use); a no-op on CPUs."""
    if device is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def event_seconds(fn: Callable[[], object], repeat: int = 10, warmup: int = 3) -> float:
    """Median seconds of `fn()` between CUDA events (GPU time of the calls, without the host's waits)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def timed(
    fn: Callable[[], object], repeat: int = 3, warmup: int = 1, device: torch.device | None = None
) -> float:
    """Median wall-clock seconds of `repeat` calls of `fn` after `warmup` untimed calls. The result of
    each call is dropped at once, so repeats never hold two outputs."""
    for _ in range(int(warmup)):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeat)):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
