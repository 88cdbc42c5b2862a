"""Serving under overload (issue 23, item 6): each fault case against a served model, then a
load of normal and oversized calls from 8 clients.

    python -m benchmarks.fault_serving [--workdir DIR] [--seconds 30]

A tiny conditional prior on the demo digits (a 4x4 grid of VQ codes) is trained and registered
in DIR's own store (a temporary folder by default; reused when DIR already has it).

`cases(workdir)` runs each fault against MLflow's scoring app in this process (the FastAPI app
that `mlflow models serve` runs, pipeline.servers.ScoringApp), where the model can be slowed
down or broken, with a 2 s request timeout and 2 calls in flight. One dict per case: `case`,
`outcome` (the answer and how fast), `lost` ("nothing" when no admitted call went unanswered
and nothing computes on after its answer) and `recover_s` (from the fault's answer to the next call
answered with images).

`load(workdir)` starts a real `mlflow models serve` (one worker, the default bounds but a token
budget of 64 images) and runs 8 clients for `seconds`: three in four calls are normal (1-4
images, a random label and seed), one in four asks for 100 images and must get a 400. A client
retries a 429 as a patient real one would (ModelServer.invoke_retrying): after a random wait
below a bound that starts at 50 ms and doubles at each refusal up to 1 s, for up to 30 s from
its first try; a normal call fails when it is still refused after 30 s or is answered with
anything but its images. Latencies are per normal call, retries included; a pinger GETs /ping
every 100 ms meanwhile.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import run_together

ROOT = Path(__file__).resolve().parents[1]
NAME = "fault-serving"
URI = f"models:/{NAME}@champion"
TIMEOUT_S = 2       # MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT of the fault cases
OVERSIZED = 100     # images of an oversized call (the load's budget is 64)


# the model

def _script(args, env, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                            text=True)
    if result.returncode:
        sys.exit(f"{args[0]} failed:\n{result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1].split("=", 1)[1]


def use_store(workdir):
    """Point this process at workdir's store; returns the tracking URI."""
    from pipeline import tracking
    uri = f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    tracking.reset_client()
    return uri


def build_model(workdir):
    """Train and register the tiny prior in workdir's store, unless it is there already."""
    from mlflow.exceptions import MlflowException
    from pipeline import tracking
    from pipeline.demo_data import write_digits
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # the store keeps its artifacts in ./mlruns of the process that creates it: the scripts
    # below create it, in workdir, and this process only opens it when it is there
    existed = (workdir / "mlflow.db").exists()
    uri = use_store(workdir)
    if existed:
        try:
            tracking.client().get_model_version_by_alias(NAME, "champion")
            return
        except MlflowException:
            pass
    train_csv, _ = write_digits(workdir / "digits")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    vqvae = _script([str(ROOT / "train_vqvae.py"), "--path_to_data", str(train_csv),
                     "--image_size", "16", "--channels", "16", "--downsample", "4",
                     "--codebook_size", "32", "--code_dim", "8", "--n_res_blocks", "1",
                     "--batch_size", "32", "--max_steps", "150", "--eval_every", "150",
                     "--checkpoint_every", "150"], env, workdir)
    _script([str(ROOT / "quantize_dataset.py"), "--run_id", vqvae], env, workdir)
    _script([str(ROOT / "train.py"), "--run_id", vqvae, "--conditional", "--n_layer", "2",
             "--n_head", "2", "--n_embd", "64", "--batch_size", "32", "--max_steps", "100",
             "--eval_every", "100", "--register", NAME], env, workdir)


# the fault cases

def _normal(label="1", seed=3, images=2):
    return {"dataframe_records": [{"num_samples": images, "label": label, "seed": seed}]}


def _recover(app, since):
    """Seconds from `since` until a normal call is answered with images."""
    while True:
        status, _ = app.invoke(_normal())
        if status == 200:
            return time.perf_counter() - since


def cases(workdir):
    import mlflow.pyfunc
    from pipeline.servers import ScoringApp, free_port
    build_model(workdir)
    os.environ["PIPELINE_SERVING_MAX_INFLIGHT"] = "2"
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(TIMEOUT_S)
    try:
        model = mlflow.pyfunc.load_model(URI)
    finally:
        for name in ("PIPELINE_SERVING_MAX_INFLIGHT", "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"):
            os.environ.pop(name)
    generator = model.unwrap_python_model().generator
    prior, real_step = generator.model, generator.model.step
    grid_tokens = prior.config.grid_h * prior.config.grid_w
    app = ScoringApp(model, free_port(), timeout_s=TIMEOUT_S).start()
    rows = []
    try:
        app.invoke(_normal())  # warm-up

        # an oversized call: refused before any row is read
        start = time.perf_counter()
        status, answer = app.invoke({"dataframe_records": [{"seed": i} for i in range(300)]})
        answered = time.perf_counter()
        rows.append({"case": "a call of 300 images (at most 256)",
                     "outcome": f"{status} in {(answered - start) * 1000:.0f} ms, no row read",
                     "lost": "nothing", "recover_s": _recover(app, answered)})

        # calls beyond the in-flight bound while two compute
        release, held = threading.Event(), []

        def busy_step(*args):
            out = real_step(*args)
            while not release.is_set():
                real_step(*args)
            return out

        prior.step = busy_step
        threads = [threading.Thread(target=lambda: held.append(app.invoke(_normal())))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        while generator.in_flight < 2:
            time.sleep(0.01)
        start = time.perf_counter()
        status, answer = app.invoke(_normal())
        refused = time.perf_counter()
        pings = sorted(app.ping()[1] for _ in range(50))
        release.set()
        for thread in threads:
            thread.join()
        del prior.step
        rows.append({"case": "a third call while 2 compute (bound 2)",
                     "outcome": f"{status} in {(refused - start) * 1000:.0f} ms; /ping p99 "
                                f"{pings[int(0.99 * (len(pings) - 1))] * 1000:.0f} ms meanwhile",
                     "lost": "nothing" if all(s in (200, 504) for s, _ in held)
                             else "a held call",
                     "recover_s": _recover(app, refused)})

        # a slow model: sampling stops at the deadline, the thread is free at once
        steps = []

        def slow_step(*args):
            steps.append(1)
            out = real_step(*args)
            give_up = time.monotonic() + 0.25
            while time.monotonic() < give_up:
                real_step(*args)
            return out

        prior.step = slow_step
        start = time.perf_counter()
        status, answer = app.invoke(_normal())
        late = time.perf_counter()
        computing = generator.in_flight
        del prior.step
        rows.append({"case": f"a call slower than its {TIMEOUT_S} s timeout",
                     "outcome": f"{status} at {late - start:.2f} s, sampling stopped after "
                                f"{len(steps)} of {grid_tokens} steps",
                     "lost": "nothing" if computing == 0
                             else f"{computing} call(s) still computing",
                     "recover_s": _recover(app, late)})

        # an error of ours
        def broken(*args, **kwargs):
            raise RuntimeError("an internal detail")

        generator.tokenizer.decode = broken
        start = time.perf_counter()
        status, answer = app.invoke(_normal())
        failed = time.perf_counter()
        del generator.tokenizer.decode
        text = json.dumps(answer)
        trace = "a stack trace" if "stack_trace" in text else "no stack trace"
        detail = "the detail shown" if "internal detail" in text else "no detail"
        rows.append({"case": "an internal error",
                     "outcome": f"{status} in {(failed - start) * 1000:.0f} ms, {trace}, {detail}",
                     "lost": "nothing", "recover_s": _recover(app, failed)})
    finally:
        app.stop()
    return rows


# batching

def batching(workdir, rows=256):
    """Seconds to answer `rows` one-image rows (each its own seed) in one call, drawn as one
    batch, against the same rows called one by one (one sampling loop each, as before)."""
    import mlflow.pyfunc
    import pandas as pd
    build_model(workdir)
    model = mlflow.pyfunc.load_model(URI)
    table = pd.DataFrame([{"label": "1", "seed": seed} for seed in range(rows)])
    model.predict(table.iloc[:4])  # warm-up
    start = time.perf_counter()
    together = model.predict(table)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    alone = [model.predict(table.iloc[i:i + 1]) for i in range(rows)]
    one_by_one = time.perf_counter() - start
    same = list(together["codes_json"]) == [a["codes_json"][0] for a in alone]
    return {"rows": rows, "batched_s": batched, "one_by_one_s": one_by_one, "same": same}


# the load

def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))] if ordered \
        else float("nan")


def load(workdir, seconds=30, clients=8):
    from pipeline import tracking
    from pipeline.servers import ModelServer, free_port
    build_model(workdir)
    classes = tracking.load_json_artifact(tracking.resolve_run_id(URI, "--model_uri"),
                                          "config.json")["data"]["classes"]
    grid_tokens = 16  # 16x16 digits, 4x downsampled
    saved = dict(os.environ)
    os.environ["PIPELINE_SERVING_MAX_TOKENS"] = str(64 * grid_tokens)
    server = ModelServer(URI, workdir, free_port(), tracking.tracking_uri())
    try:
        server.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    lock = threading.Lock()
    latencies, failures, refusals, wrong_oversized, pings = [], [], [], [], []
    images = [0]
    try:
        server.invoke(_normal())  # warm-up, not counted
        stop_at = time.monotonic() + seconds

        def client(index):
            rng = random.Random(index)
            while time.monotonic() < stop_at:
                if rng.random() < 0.25:
                    body = {"dataframe_records": [{"num_samples": OVERSIZED // 2}] * 2}
                    status, _ = server.invoke(body)
                    if status != 400:
                        with lock:
                            wrong_oversized.append(status)
                    continue
                count = rng.randint(1, 4)
                body = _normal(rng.choice(classes), rng.randrange(10 ** 6), count)
                start = time.perf_counter()
                status, answer, refused = server.invoke_retrying(body, rng=rng)
                seconds_taken = time.perf_counter() - start
                ok = status == 200 and len(answer["predictions"]) == count
                with lock:
                    refusals.append(refused)
                    if ok:
                        latencies.append(seconds_taken)
                        images[0] += count
                    else:
                        failures.append((status, str(answer)[:200]))

        def pinger():
            while time.monotonic() < stop_at:
                status, seconds_taken = server.ping()
                pings.append(seconds_taken if status == 200 else float("inf"))
                time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        threads.append(threading.Thread(target=pinger))
        wall = run_together(threads)
    finally:
        server.stop()
    return {"clients": clients, "seconds": wall, "normal_calls": len(latencies),
            "images_per_s": images[0] / wall, "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "ping_p99_ms": percentile(pings, 0.99) * 1000, "pings": len(pings),
            "refusals_429": sum(refusals), "failed_normal": len(failures),
            "oversized_not_400": len(wrong_oversized), "failures": failures[:5]}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="folder for the store and the model (default: a "
                                          "temporary one)")
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        started = time.perf_counter()
        build_model(workdir)
        print(f"model {URI} ready in {time.perf_counter() - started:.0f} s")
        print(f"{'case':42} | {'outcome':62} | lost    | recover_s")
        for row in cases(workdir):
            print(f"{row['case']:42} | {row['outcome']:62} | {row['lost']:7} | "
                  f"{row['recover_s']:.2f}")
        timing = batching(workdir)
        print(f"batching: {timing['rows']} one-image rows in one call {timing['batched_s']:.2f} s, "
              f"called one by one {timing['one_by_one_s']:.2f} s; the same codes: "
              f"{timing['same']}")
        figures = load(workdir, args.seconds)
    print(f"load: {figures['clients']} clients for {figures['seconds']:.0f} s, 1 in 4 calls of "
          f"{OVERSIZED} images: {figures['images_per_s']:.1f} images/s over "
          f"{figures['normal_calls']} normal calls, latency p50 {figures['p50_ms']:.0f} ms, p99 "
          f"{figures['p99_ms']:.0f} ms (retries included); /ping p99 "
          f"{figures['ping_p99_ms']:.0f} ms over {figures['pings']}; {figures['refusals_429']} "
          f"429s retried; failed normal calls: {figures['failed_normal']}; oversized calls not "
          f"refused with 400: {figures['oversized_not_400']}")
    for failure in figures["failures"]:
        print(f"  {failure}")
    sys.exit(1 if figures["failed_normal"] or figures["oversized_not_400"] else 0)


if __name__ == "__main__":
    main()
