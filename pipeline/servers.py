"""Start and stop real MLflow servers on loopback: the tracking server (`mlflow server`) and a
model server (`mlflow models serve`), or MLflow's scoring app in this process (ScoringApp, to
reach into the model). Used by the tests (tests/test_server.py, tests/test_serving.py) and by
the benchmarks (benchmarks/bench_tracking.py, bench_serving.py, fault_serving.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


class _Served:
    """A server process in its own process group, waited for on its health URL."""

    process = None

    def _launch(self, command, log_path, health_url, deadline_s, env=None):
        log = open(log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=env)
        # Servers need seconds here before answering; wait for the answer, not for a clock.
        give_up = time.monotonic() + deadline_s
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[2]} exited: {Path(log_path).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{health_url} did not answer within {deadline_s} s")

    def stop(self):
        """SIGKILL the whole group (uvicorn runs workers in child processes)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class MlflowServer(_Served):
    """`mlflow server` on a fixed port, so it can be restarted."""

    def __init__(self, folder, port):
        self.folder, self.port = Path(folder), port
        self.uri = f"http://127.0.0.1:{port}"
        self.artifacts = self.folder / "artifacts"

    def start(self, deadline_s=120):
        return self._launch(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.artifacts)],
            self.folder / "server.log", f"{self.uri}/health", deadline_s)


class _Invoked:
    """A client of a model server at `self.url`."""

    url = None

    def invoke(self, body, timeout=300):
        """POST /invocations; `body` is a dict (sent as JSON) or raw bytes.
        Returns (HTTP status, decoded JSON answer or the raw text)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/invocations", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def invoke_retrying(self, body, give_up_s=30.0, first_wait_s=0.05, max_wait_s=1.0,
                        rng=None):
        """invoke() as a patient client: a 429 (the server is busy) is retried after a random
        wait between 0 and a bound that starts at first_wait_s and doubles at each refusal up to
        max_wait_s (random, so refused clients do not all come back at once), until give_up_s
        have passed since the first try. Returns (status, answer, 429s received)."""
        import random
        rng, bound, refusals = rng or random.Random(), first_wait_s, 0
        give_up = time.monotonic() + give_up_s
        while True:
            status, answer = self.invoke(body)
            if status != 429:
                return status, answer, refusals
            refusals += 1
            if time.monotonic() >= give_up:
                return status, answer, refusals
            time.sleep(rng.uniform(0, bound))
            bound = min(max_wait_s, 2 * bound)

    def ping(self, timeout=30):
        """GET /ping -> (HTTP status, seconds it took)."""
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=timeout) as response:
                status = response.status
        except urllib.error.HTTPError as e:
            status = e.code
        return status, time.perf_counter() - start


class ModelServer(_Served, _Invoked):
    """`mlflow models serve -m <model uri> --env-manager local` (the current environment)."""

    def __init__(self, model_uri, folder, port, tracking_uri, workers=1):
        self.model_uri, self.folder, self.port = model_uri, Path(folder), port
        self.tracking_uri, self.workers = tracking_uri, workers
        self.url = f"http://127.0.0.1:{port}"

    def start(self, deadline_s=300):
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri}
        return self._launch(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port),
             "-w", str(self.workers)],
            self.folder / "model_server.log", f"{self.url}/ping", deadline_s, env)


class ScoringApp(_Invoked):
    """MLflow's scoring app (what `mlflow models serve` runs: FastAPI under uvicorn, predict in
    a thread pool, MLflow's request timeout) for a pyfunc model loaded in this process, served
    on loopback from a thread. The caller can reach into the model to inject faults."""

    def __init__(self, pyfunc_model, port, timeout_s=None):
        self.model, self.port, self.timeout_s = pyfunc_model, port, timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.server = self.thread = None

    def start(self, deadline_s=60):
        import uvicorn
        from mlflow.pyfunc import scoring_server
        # init() reads the timeout and marks the process as serving; both are put back after
        names = ("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "_MLFLOW_IS_IN_SERVING_ENVIRONMENT")
        saved = {name: os.environ.get(name) for name in names}
        if self.timeout_s is not None:
            os.environ[names[0]] = str(self.timeout_s)
        try:
            app = scoring_server.init(self.model)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        give_up = time.monotonic() + deadline_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > give_up:
                raise RuntimeError(f"the scoring app on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self):
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
