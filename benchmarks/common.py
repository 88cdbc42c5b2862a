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


def with_training_quantiles(tokenizer, path_to_data):
    """A VQ-VAE tokenizer trained before tone matching recorded no training pixel quantiles:
    take them from its training split of `path_to_data`, as it records them now (every image
    of a split under tone.MAX_IMAGES), so its priors are judged as the pipeline now judges."""
    if tokenizer.kind == "vqvae" and tokenizer.pixel_quantiles is None:
        from pipeline.run import load_split_images
        from pipeline.tone import pixel_quantiles
        tokenizer.pixel_quantiles = pixel_quantiles(
            load_split_images(tokenizer.run_id, path_to_data)[0])
    return tokenizer
