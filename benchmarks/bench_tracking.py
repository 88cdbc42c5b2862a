"""What the tracking server costs a training loop, against a real `mlflow server` on loopback.

    python -m benchmarks.bench_tracking [--checkpoint_mb 100]

Prints: the server's start-up time, a synchronous `log_batch` (what logging every step would
cost), a queued metric in the background `Uploader` (what the trainers pay), and a checkpoint
written locally (atomic) against the same file uploaded through the server.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.servers import MlflowServer, free_port


def median_seconds(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(tmp) / "server", free_port())
        server.folder.mkdir()
        start = time.perf_counter()
        server.start()
        print(f"mlflow server on loopback answers /health after {time.perf_counter() - start:.1f} s")
        try:
            os.environ["MLFLOW_TRACKING_URI"] = server.uri
            from mlflow.entities import Metric
            from pipeline import tracking
            from pipeline.checkpoint import save_checkpoint
            run_id = tracking.create_run("benchmark")

            metrics = [Metric(k, 0.5, 0, 1) for k in ("train/loss", "train/lr", "train/speed")]
            sync = median_seconds(lambda: tracking.client().log_batch(run_id, metrics=metrics), 50)
            print(f"synchronous log_batch of 3 metrics: {sync * 1e3:.1f} ms per call (median of 50)")

            uploader = tracking.Uploader(run_id)
            n = 10_000
            start = time.perf_counter()
            for step in range(n):
                uploader.log_metrics({"train/loss": 0.5, "train/lr": 1e-3, "train/speed": 1.0}, step)
            queued = (time.perf_counter() - start) / n
            start = time.perf_counter()
            assert uploader.close(timeout=300) == ([], [])
            print(f"Uploader.log_metrics of 3 metrics: {queued * 1e6:.1f} us per call "
                  f"({sync / queued:.0f}x cheaper); sending all {3 * n} took "
                  f"{time.perf_counter() - start:.1f} s in the background")

            weights = {"w": torch.randn(args.checkpoint_mb * 2 ** 20 // 4)}
            path = Path(tmp) / "ckpt" / "last.pt"
            local = median_seconds(lambda: save_checkpoint(weights, path), 3)
            upload = median_seconds(lambda: tracking.client().log_artifact(
                run_id, str(path), "checkpoints"), 3)
            print(f"{args.checkpoint_mb} MB checkpoint: local atomic save {local:.2f} s, upload "
                  f"through the server {upload:.2f} s ({args.checkpoint_mb / upload:.0f} MB/s); "
                  f"the trainers wait only for the save")
            tracking.end_run(run_id)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
