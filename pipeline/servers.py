"""Start and stop real MLflow servers on loopback: the tracking server (`mlflow server`) and a
model server (`mlflow models serve`). Used by the tests (tests/test_server.py,
tests/test_serving.py) and by the benchmarks (benchmarks/bench_tracking.py, bench_serving.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
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


class ModelServer(_Served):
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
