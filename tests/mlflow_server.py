"""Start and stop a real `mlflow server` on loopback (used by the tests and a benchmark)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class MlflowServer:
    """`mlflow server` in its own process group, on a fixed port so it can be restarted."""

    def __init__(self, folder, port):
        self.folder, self.port = Path(folder), port
        self.uri = f"http://127.0.0.1:{port}"
        self.artifacts = self.folder / "artifacts"
        self.process = None

    def start(self, deadline_s=120):
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.artifacts)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # The server needs 6-15 s here before /health answers; wait for it, not for a clock.
        give_up = time.monotonic() + deadline_s
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {deadline_s} s")

    def stop(self):
        """SIGKILL the whole group (uvicorn runs workers in child processes)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
