"""A bounded load test of a served model: `mlflow models serve` on loopback, N requests from C
concurrent clients. Prints images/s, latency percentiles and the failed-request count.

    python -m benchmarks.bench_serving --model_uri models:/demo-digits@champion   # after the demo
    python -m benchmarks.bench_serving --model_uri models:/NAME/1 --requests 200 --clients 8

Run it in the folder whose mlflow.db holds the model (or set MLFLOW_TRACKING_URI). Each request
asks for `--images` images with a random seed (and a random label when the model has labels).
Bad requests are measured too: they must come back as 4xx, quickly, and not disturb the rest.
A call the server refuses as busy (429: more calls than PIPELINE_SERVING_MAX_INFLIGHT) is
retried after a random, doubling wait (ModelServer.invoke_retrying); its latency includes the
retries, and it fails only when still refused after 30 s.
"""

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time

from benchmarks.common import run_together
from pipeline import tracking
from pipeline.servers import ModelServer, free_port


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_uri", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    args = parser.parse_args()

    run_id = tracking.resolve_run_id(args.model_uri, "--model_uri")
    classes = tracking.load_json_artifact(run_id, "config.json")["data"].get("classes")
    with tempfile.TemporaryDirectory() as tmp:
        server = ModelServer(args.model_uri, tmp, free_port(), tracking.tracking_uri(),
                             args.workers)
        started = time.perf_counter()
        server.start()
        print(f"model server for {args.model_uri} (run {run_id}) answered /ping after "
              f"{time.perf_counter() - started:.1f} s; {args.workers} worker(s)")
        try:
            server.invoke({"dataframe_records": [{"seed": 0}]})  # warm-up, not counted
            latencies, failures, refusals, lock = [], [], [], threading.Lock()
            jobs = list(range(args.requests))

            def client(index):
                rng = random.Random(index)
                while True:
                    with lock:
                        if not jobs:
                            return
                        jobs.pop()
                    record = {"num_samples": args.images, "seed": rng.randrange(10 ** 6)}
                    if classes:
                        record["label"] = rng.choice(classes)
                    start = time.perf_counter()
                    status, answer, refused = server.invoke_retrying(
                        {"dataframe_records": [record]}, rng=rng)
                    seconds = time.perf_counter() - start
                    ok = status == 200 and len(answer["predictions"]) == args.images
                    with lock:
                        refusals.append(refused)
                        (latencies if ok else failures).append(seconds if ok else (status, answer))

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            wall = run_together(threads)

            bad_seconds = []
            for body in ({"dataframe_records": [{"num_samples": 10 ** 6}]},
                         {"dataframe_records": [{"label": "no-such-label"}]},
                         {"dataframe_records": [{"temperature": -1}]}, b"{not json"):
                start = time.perf_counter()
                status, _ = server.invoke(body)
                bad_seconds.append(time.perf_counter() - start)
                if not 400 <= status < 500:
                    failures.append((status, "a bad request was not refused with a 4xx"))
        finally:
            server.stop()

    images = len(latencies) * args.images
    print(f"{args.requests} requests x {args.images} image(s) from {args.clients} concurrent "
          f"clients in {wall:.1f} s: {images / wall:.1f} images/s, {len(latencies) / wall:.1f} "
          f"requests/s")
    if latencies:
        print(f"latency: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p90 "
              f"{percentile(latencies, 0.9) * 1000:.0f} ms, p99 "
              f"{percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms, "
              f"mean {statistics.mean(latencies) * 1000:.0f} ms")
    print(f"bad requests (huge num_samples, unknown label, negative temperature, malformed "
          f"JSON): refused in {max(bad_seconds) * 1000:.0f} ms at most")
    print(f"busy refusals (429) retried: {sum(refusals)}; failed requests: {len(failures)}")
    for failure in failures[:5]:
        print(f"  {str(failure)[:300]}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
