"""Shared benchmark helpers: timing and the machine's measured matmul peak."""

import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1, warmup=1):
    """Median-free simple timing: run `warmup` times, then `repeat` times; seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def run_together(threads):
    """Start every thread, wait for all of them; -> the wall seconds that took."""
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def matmul_peak_flops(device, size=None, dtype=torch.float32, seconds=1.0):
    """Measured FLOP/s of a large square matmul: the roof that throughput figures are read
    against (a fraction of a measured peak, not of a datasheet number)."""
    size = size or (2048 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    sync(device)
    return 2 * size ** 3 * calls / (time.perf_counter() - start)

