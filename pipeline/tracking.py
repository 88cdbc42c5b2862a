"""MLflow plumbing: runs, lineage checks, artifacts, and metric logging that never slows training.

Everything goes through one `MlflowClient` bound to `MLFLOW_TRACKING_URI` (MLflow's embedded
default, `sqlite:///mlflow.db` in the working directory, when it is unset). Runs are addressed by
id; the tag `pipeline.stage` says what a run is, and `pipeline.vqvae_run_id` links a prior to its
tokenizer.
"""

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

STAGE_TAG = "pipeline.stage"
VQVAE_RUN_TAG = "pipeline.vqvae_run_id"
DEFAULT_EXPERIMENT = "Default"

_client = None


def _quiet_mlflow():
    # The sqlite store logs its schema migrations at INFO on first use; users need none of it.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client():
    """The process-wide MlflowClient (created lazily: importing this module is cheap)."""
    global _client
    if _client is None:
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient
        _client = MlflowClient()
    return _client


def reset_client():
    """Forget the cached client, e.g. after a test changes MLFLOW_TRACKING_URI."""
    global _client
    _client = None


def tracking_uri():
    import mlflow
    return mlflow.get_tracking_uri()


def experiment_id(name=None):
    """Id of the experiment `name` (or $MLFLOW_EXPERIMENT_NAME, or Default), created if new."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client().get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client().create_experiment(name)


def create_run(stage, experiment=None, run_name=None, tags=None, parent_run_id=None):
    """Start a run tagged with its stage (and parent, for pipeline child runs); return its id."""
    all_tags = {STAGE_TAG: stage, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client().create_run(experiment_id(experiment), tags=all_tags, run_name=run_name)
    return run.info.run_id


def end_run(run_id, status="FINISHED"):
    client().set_terminated(run_id, status)


def get_run(run_id, stage=None, flag="--run_id"):
    """Fetch a run, failing with a one-line UserError if it is unknown or of the wrong stage."""
    from mlflow.exceptions import MlflowException
    from pipeline.errors import UserError
    try:
        run = client().get_run(run_id)
    except MlflowException:
        raise UserError(f"{flag} {run_id}: no such MLflow run in {tracking_uri()}")
    actual = run.data.tags.get(STAGE_TAG)
    if stage is not None and actual != stage:
        raise UserError(f"{flag} {run_id}: is a '{actual or 'untagged'}' run, "
                        f"expected a '{stage}' run")
    return run


def log_params(run_id, params):
    """Log a flat dict of settings as params (MLflow takes at most 100 per call)."""
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client().log_batch(run_id, params=items[i:i + 100])


def log_json(run_id, obj, artifact_file):
    """Log `obj` as the JSON artifact `artifact_file` (e.g. "config.json", "codes/train.json")."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True))
        log_artifact(run_id, path, str(Path(artifact_file).parent).strip("."))


def log_artifact(run_id, local_path, artifact_dir=""):
    """Upload a finished local file under `artifact_dir`, retrying transient store failures."""
    _with_retries(lambda: client().log_artifact(run_id, str(local_path), artifact_dir or None),
                  f"upload {Path(local_path).name} to run {run_id}")


def log_artifacts(run_id, local_dir, artifact_dir):
    """Upload every file of `local_dir` under `artifact_dir`, retrying transient failures."""
    _with_retries(lambda: client().log_artifacts(run_id, str(local_dir), artifact_dir),
                  f"upload {artifact_dir}/ to run {run_id}")


def log_image(run_id, image, key, step):
    """A PIL image under `key` at `step`, so the MLflow UI's step slider shows progress."""
    _with_retries(lambda: client().log_image(run_id, image, key=key, step=step),
                  f"log image '{key}' to run {run_id}", required=False)


def list_artifacts(run_id, path=None):
    return [a.path for a in client().list_artifacts(run_id, path)]


def download_artifact(run_id, artifact_path, dst_dir, flag="--run_id"):
    """Download one artifact to `dst_dir` and return its local path (UserError if missing)."""
    import mlflow.artifacts
    from pipeline.errors import UserError
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(dst_dir),
                                                    tracking_uri=tracking_uri())
    except Exception as e:  # MLflow raises several types for a missing artifact
        raise UserError(f"{flag} {run_id}: has no artifact '{artifact_path}' "
                        f"({type(e).__name__})")
    return Path(local)


def load_json_artifact(run_id, artifact_path, flag="--run_id"):
    from pipeline.errors import UserError
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run_id, artifact_path, tmp, flag)
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{flag} {run_id}: artifact '{artifact_path}' is not valid JSON")


def _with_retries(fn, what, attempts=4, required=True):
    """Call fn, retrying with backoff (1, 2, 4 s). A store outage must not lose training work:
    if every attempt fails, warn and carry on (required=False) or raise (required=True)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts - 1:
                print(f"warning: could not {what} after {attempts} tries: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      file=sys.stderr)
                if required:
                    raise
                return None
            time.sleep(2 ** attempt)


class MetricLogger:
    """Buffers metrics and sends them with one `log_batch` call every `flush_secs`.

    A synchronous call per step costs ~60 ms against a remote server; batching makes logging a
    negligible fraction of a training step. If the store is unreachable the buffer is kept and
    retried at the next flush, so no metric is lost to a short outage.
    """

    def __init__(self, run_id, flush_secs=5.0, max_buffer=100_000):
        self.run_id = run_id
        self.flush_secs = flush_secs
        self.max_buffer = max_buffer
        self.buffer = []
        self.last_flush = time.monotonic()
        self.warned = False

    def log(self, metrics, step):
        from mlflow.entities import Metric
        now_ms = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now_ms, int(step)) for k, v in metrics.items())
        if time.monotonic() - self.last_flush >= self.flush_secs:
            self.flush()

    def flush(self):
        self.last_flush = time.monotonic()
        try:
            for i in range(0, len(self.buffer), 1000):  # MLflow caps a batch at 1000 metrics
                client().log_batch(self.run_id, metrics=self.buffer[i:i + 1000])
            self.buffer = []
            if self.warned:
                print("tracking store reachable again; buffered metrics sent", file=sys.stderr)
                self.warned = False
        except Exception as e:
            if not self.warned:
                print(f"warning: tracking store unreachable ({type(e).__name__}); "
                      f"keeping {len(self.buffer)} metrics to retry", file=sys.stderr)
                self.warned = True
            # A long outage must not grow memory without bound: keep the newest metrics.
            self.buffer = self.buffer[-self.max_buffer:]
            return False
        return True
