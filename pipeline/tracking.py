"""MLflow plumbing: runs, lineage checks, artifacts, and metric logging that never slows training.

Everything goes through one `MlflowClient` bound to `MLFLOW_TRACKING_URI` (MLflow's embedded
default, `sqlite:///mlflow.db` in the working directory, when it is unset). Runs are addressed by
id; the tag `pipeline.stage` says what a run is (`tokenizer`, `prior`, `pipeline`, `probe`),
`pipeline.tokenizer` / `pipeline.prior` which kind or family, and `pipeline.tokenizer_run_id`
links a prior to its tokenizer. Runs made before tokenizers and priors became families carry
the stages `vqvae` and `transformer` and the tag `pipeline.vqvae_run_id`; they read as a
`vqvae` tokenizer and a `gpt` prior.
"""

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pipeline import visual

STAGE_TAG = "pipeline.stage"
TOKENIZER_TAG = "pipeline.tokenizer"
PRIOR_TAG = "pipeline.prior"
TOKENIZER_RUN_TAG = "pipeline.tokenizer_run_id"
VQVAE_RUN_TAG = "pipeline.vqvae_run_id"  # the lineage tag of runs made before the families
LEGACY_STAGES = {"vqvae": ("tokenizer", "vqvae"), "transformer": ("prior", "gpt")}
DEFAULT_EXPERIMENT = "Default"

_client = None


def _quiet_mlflow():
    # The sqlite store logs its schema migrations at INFO on first use; users need none of it.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's default (7 HTTP retries, backoff 2 s) makes a call to a server that is down hang
    # for ~4 minutes before failing; 3 retries fail in ~15 s. Our uploader retries on its own.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")


def client():
    """The process-wide MlflowClient (created lazily: importing this module is cheap)."""
    global _client
    if _client is None:
        _quiet_mlflow()
        _client = _open_client()
    return _client


def _sqlite_file():
    """The database file of an embedded `sqlite:///` store, or None (a server, :memory:)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine.url import make_url
    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def _open_client(attempts=3):
    """An MlflowClient; an embedded sqlite store is created or migrated under a file lock
    beside it.

    MLflow creates and migrates the tables on a process's first access to the store; two
    processes doing it at once on a fresh mlflow.db collide ("duplicate column", "table already
    exists", alembic's "expected to match one row"). Our processes take turns on the lock; a
    process that does not take it (`mlflow ui`) can still collide with us, so a failed
    migration is retried once the other has had time to finish, after clearing the scratch
    tables a migration cut short leaves behind."""
    from mlflow.tracking import MlflowClient
    database = _sqlite_file()
    if database is None:
        return MlflowClient()
    from filelock import FileLock
    database.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        try:
            with FileLock(str(database) + ".lock", timeout=300):
                return MlflowClient()  # which builds the store: tables, migrations
        except Exception as e:
            if attempt == attempts - 1 or not _migration_race(e):
                raise
            _wait_until_quiet(database)  # the other process finished or died
            with FileLock(str(database) + ".lock", timeout=300):
                _drop_scratch_tables(database)


def _wait_until_quiet(database, quiet_s=2.0, limit_s=60.0):
    """Wait until the database file has not changed for `quiet_s` seconds (at most limit_s)."""
    give_up, last = time.monotonic() + limit_s, None
    while time.monotonic() < give_up:
        stamp = database.stat().st_mtime_ns if database.exists() else None
        if stamp == last:
            return
        last = stamp
        time.sleep(quiet_s)


def _drop_scratch_tables(database):
    """Drop the `_alembic_tmp_<table>` copies a migration cut short left beside an intact
    <table> (alembic rebuilds a sqlite table through such a copy; a leftover one makes every
    later migration fail)."""
    import sqlite3
    connection = sqlite3.connect(database, timeout=60)
    try:
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        for name in tables:
            if name.startswith("_alembic_tmp_") and name[len("_alembic_tmp_"):] in tables:
                connection.execute(f'DROP TABLE "{name}"')
        connection.commit()
    finally:
        connection.close()


def _migration_race(e):
    """Whether `e` is what a concurrent creation or migration of the sqlite tables raises."""
    while e is not None:
        if type(e).__module__.split(".")[0] in ("sqlalchemy", "alembic", "sqlite3"):
            return True
        e = e.__cause__ or e.__context__
    return False


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


def stage_of(run):
    """(stage, kind) of a run: ("tokenizer", "vqvae"), ("prior", "gpt"), ("pipeline", None)..."""
    tags = run.data.tags
    stage = tags.get(STAGE_TAG)
    if stage in LEGACY_STAGES:
        return LEGACY_STAGES[stage]
    return stage, tags.get(TOKENIZER_TAG if stage == "tokenizer" else PRIOR_TAG)


def tokenizer_run_of(run):
    """The tokenizer run id a prior run was trained on (None for a local code file)."""
    return run.data.tags.get(TOKENIZER_RUN_TAG) or run.data.tags.get(VQVAE_RUN_TAG)


def resolve_run_id(spec, flag="--run_id"):
    """A run id from a run id, `models:/NAME/VERSION`, `models:/NAME@alias` or `models:/<model
    id>` (the run that logged that model); anything else is returned unchanged."""
    from mlflow.exceptions import MlflowException
    from core.errors import UserError
    if not isinstance(spec, str) or not spec.startswith("models:/"):
        return spec
    target = spec[len("models:/"):].strip("/")
    try:
        if "@" in target:
            name, alias = target.split("@", 1)
            run_id = client().get_model_version_by_alias(name, alias).run_id
        elif "/" in target:
            name, version = target.split("/", 1)
            run_id = client().get_model_version(name, version).run_id
        else:
            run_id = client().get_logged_model(target).source_run_id
    except MlflowException as e:
        raise UserError(f"{flag} {spec}: no such registered model or version in "
                        f"{tracking_uri()} ({str(e).splitlines()[0][:200]})")
    if not run_id:
        raise UserError(f"{flag} {spec}: the model names no run it came from")
    return run_id


def get_run(run_id, stage=None, flag="--run_id", kind=None):
    """Fetch a run, failing with a one-line UserError if it is unknown, of the wrong stage,
    or (with `kind`) of the wrong tokenizer kind / prior family."""
    from mlflow.exceptions import MlflowException
    from core.errors import UserError
    try:
        run = client().get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            raise UserError(f"{flag} {run_id}: no such MLflow run in {tracking_uri()}")
        raise UserError(f"{flag} {run_id}: cannot read the run from the tracking store "
                        f"({describe_error(e)})")
    actual, actual_kind = stage_of(run)
    if stage is not None and actual != stage:
        raise UserError(f"{flag} {run_id}: is a '{actual or 'untagged'}' run, "
                        f"expected a '{stage}' run")
    if kind is not None and actual_kind != kind:
        raise UserError(f"{flag} {run_id}: is a '{actual_kind}' {actual} run, expected a "
                        f"'{kind}' one")
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
    name = step_image_name(key, step)  # fixed here, so that a retry rewrites the same files
    _with_retries(lambda: log_step_image(run_id, image, key, step, name),
                  f"log image '{key}' to run {run_id}", required=False)


def step_image_name(key, step):
    """The file name (less its suffix) MLflow's log_image gives the image `key` at `step`:
    images/<key, / as ~>+step+<step>+timestamp+<ms>+<uuid>. The run page finds the images of
    its cards by this pattern (tests/test_describe.py checks it against MLflow's own)."""
    return (f"{key.replace('/', '~')}+step+{int(step)}+timestamp+{int(time.time() * 1000)}"
            f"+{uuid.uuid4()}")


def log_step_image(run_id, image, key, step, name=None):
    """Log a PIL image under `key` at `step`, for the run page's image card and its step slider.

    What MlflowClient.log_image(key=, step=) writes, except the `+compressed` twin that the card
    shows: log_image writes a WebP of at most 256 px, which MLflow 3.17's artifact browser does
    not preview (its previews list .png, .jpg, .gif, .bmp, .svg, not .webp: they showed blank),
    and which sits small in the card's box. Here it is a PNG from `card_image`; the card reads
    .png twins as well as .webp.
    name: from step_image_name, fixed when the image is queued so that a retry rewrites the same
    files."""
    name = name or step_image_name(key, step)
    client_ = client()
    with tempfile.TemporaryDirectory() as tmp:
        full, card = Path(tmp) / f"{name}.png", Path(tmp) / f"{name}+compressed.png"
        image.save(full, format="PNG")
        visual.card_image(image).save(card, format="PNG")
        client_.log_artifact(run_id, str(card), "images")
        client_.log_artifact(run_id, str(full), "images")
    client_.set_tag(run_id, "mlflow.loggedImages", "True")  # as log_image sets it


def list_artifacts(run_id, path=None):
    return [a.path for a in client().list_artifacts(run_id, path)]


def download_artifact(run_id, artifact_path, dst_dir, flag="--run_id"):
    """Download one artifact to `dst_dir` and return its local path (UserError if missing)."""
    import mlflow.artifacts
    from core.errors import UserError
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=str(dst_dir),
                                                    tracking_uri=tracking_uri())
    except Exception as e:  # MLflow raises several types for a missing artifact
        reason = describe_error(e)
        if reason.startswith(("cannot connect", "no answer")):
            raise UserError(f"{flag} {run_id}: cannot download '{artifact_path}' ({reason})")
        raise UserError(f"{flag} {run_id}: has no artifact '{artifact_path}' "
                        f"({type(e).__name__})")
    return Path(local)


def load_json_artifact(run_id, artifact_path, flag="--run_id"):
    from core.errors import UserError
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(run_id, artifact_path, tmp, flag)
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{flag} {run_id}: artifact '{artifact_path}' is not valid JSON")


def log_metrics(run_id, metrics, step, model_id=None, dataset=None):
    """Log a dict of metrics at `step` now, in one call (for one-off summaries, not training);
    linked to a logged model and naming an MLflow Dataset when given (the Models tab's figures;
    MLflow's SQL store keeps the dataset only on metrics linked to a model)."""
    from mlflow.entities import Metric
    now_ms = int(time.time() * 1000)
    named = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset else {}
    items = [Metric(k, float(v), now_ms, int(step), model_id=model_id, **named)
             for k, v in sorted(metrics.items())]
    _with_retries(lambda: client().log_batch(run_id, metrics=items), f"log metrics to run {run_id}")


def require_psutil():
    """--system_metrics needs psutil (an optional dependency): one line saying so, before any
    run is created."""
    from core.errors import UserError
    import importlib.util
    if importlib.util.find_spec("psutil") is None:
        raise UserError("--system_metrics needs psutil, an optional dependency: "
                        "pip install psutil")


@contextlib.contextmanager
def system_metrics(run_id):
    """While the block runs, MLflow's SystemMetricsMonitor logs the machine's figures to
    `run_id` as system/... (CPU and memory use, disk, network, and the GPU's with nvidia-ml-py)
    every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default). Runs are made with
    MlflowClient.create_run, for which mlflow.enable_system_metrics_logging() does nothing, so
    the monitor is started here for the run id. One more sample is logged at the end, so a run
    shorter than the interval has one too. run_id None: nothing."""
    if run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:  # the samples since the last one logged (finish() drops them), at the next step
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as e:  # a lost sample must not fail a finished training
            print(f"warning: run {run_id}: could not log the last system metrics: "
                  f"{describe_error(e)}", file=sys.stderr)


def describe_error(e):
    """A one-line account of a tracking-store failure, e.g. for "could not upload ... (...)"."""
    text = str(e).strip()
    if "Failed to establish a new connection" in text or "Connection refused" in text:
        return f"cannot connect to {tracking_uri()}"
    if "Max retries exceeded" in text or "Read timed out" in text:
        return f"no answer from {tracking_uri()}"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def is_transient(e):
    """Whether retrying can cure `e`: no connection, a timeout, a server-side error. A request
    the server answered and refused (a bad value, a missing file here) will fail again."""
    import requests
    from mlflow.exceptions import MlflowException
    if isinstance(e, requests.exceptions.HTTPError):
        return e.response is None or e.response.status_code >= 500 or e.response.status_code == 429
    if isinstance(e, requests.exceptions.RequestException):
        return True
    if isinstance(e, MlflowException):  # MLflow reports "could not connect" as INTERNAL_ERROR
        return e.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE",
                                "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED")
    return False


def store_failure(e):
    """A one-line message if `e` is a failure of the tracking store itself, else None."""
    from mlflow.exceptions import MlflowException
    import requests
    if isinstance(e, (MlflowException, requests.exceptions.RequestException)):
        reason = describe_error(e)
        return (f"MLflow tracking store: {reason}" if tracking_uri() in reason else
                f"MLflow tracking store {tracking_uri()}: {reason}")
    return None


def _with_retries(fn, what, attempts=3, required=True):
    """Call fn, retrying with backoff (1, 2 s) on top of MLflow's own HTTP retries. If every
    attempt fails, raise (required=True) or warn and carry on (required=False)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts - 1:
                if required:
                    raise
                print(f"warning: could not {what}: {describe_error(e)}", file=sys.stderr)
                return None
            time.sleep(2 ** attempt)


def _say(message):
    """A line on stderr that does not garble a progress bar drawn at the same time."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)


class Uploader:
    """Sends one run's metrics, images and checkpoint uploads from a background thread.

    Training never waits on the tracking store: `log_metrics` and `submit` only queue. Metrics go
    out in one `log_batch` per `flush_secs` (a synchronous call per step would cost ~60 ms
    against a remote server). If the store becomes unreachable, everything queued is kept and
    retried with growing pauses (up to a minute), with one warning when the outage starts and one
    line when it ends. An upload the store refuses outright (401, 403, 413: retrying cannot
    cure it) is dropped with a warning and kept in `dropped` until a later upload of the same
    artifact succeeds. `close` waits for the queue to drain and returns what could not be sent.

    heartbeat: a function -> {tag: value}, sent with the metrics every `heartbeat_secs` (the
    run's lease, pipeline/runs.py).
    """

    def __init__(self, run_id, flush_secs=5.0, heartbeat=None, heartbeat_secs=60.0):
        self.run_id, self.flush_secs = run_id, flush_secs
        self.heartbeat, self.heartbeat_secs = heartbeat, heartbeat_secs
        self.next_beat = time.monotonic() + heartbeat_secs
        self.metrics = []  # pending mlflow Metric entities, oldest first
        self.jobs = {}  # key -> (what, fn); a newer upload of the same artifact replaces an older
        self.dropped = {}  # key -> (what, reason) of uploads the store refused
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closing = self.abandoned = False
        self.outage = None  # description of the current failure, while there is one
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"uploader-{run_id[:8]}")
        self.thread.start()

    def log_metrics(self, metrics, step, timestamp_ms=None):
        from mlflow.entities import Metric
        now_ms = timestamp_ms or int(time.time() * 1000)
        with self.lock:
            self.metrics.extend(Metric(k, float(v), now_ms, int(step)) for k, v in metrics.items())

    def submit(self, key, fn, what):
        """Queue fn() (an upload); `what` names it in messages. Returns at once."""
        with self.lock:
            self.jobs.pop(key, None)  # re-queue at the end, after the metrics that preceded it
            self.jobs[key] = (what, fn)
        self.wake.set()

    def pending(self):
        """(unsent metrics, names of unsent uploads)."""
        with self.lock:
            return list(self.metrics), [what for what, _ in self.jobs.values()]

    def close(self, timeout, progress=True):
        """Send everything still queued, trying for up to `timeout` seconds; stop the thread.
        progress: a bar (pipeline/progress.py) over the queued uploads and metric batches
        while it waits. Returns `pending()`: empty lists when everything was sent."""
        from pipeline.progress import progress_bar
        self.closing = True
        self.wake.set()
        give_up = time.monotonic() + timeout
        with progress_bar(self._queued(), "uploading", "upload", progress) as bar:
            while self.thread.is_alive() and time.monotonic() < give_up:
                self.thread.join(min(0.5, give_up - time.monotonic()))
                bar.update(bar.total - self._queued() - bar.n)
        self.abandoned = True
        self.wake.set()
        return self.pending()

    def _queued(self):
        """What is left to send, as the requests that send it: uploads and metric batches."""
        metrics, uploads = self.pending()
        return len(uploads) + -(-len(metrics) // 1000)

    def _loop(self):
        pause = self.flush_secs
        while not self.abandoned:
            self.wake.wait(pause)
            self.wake.clear()
            if self.abandoned:
                return
            sent = self._send()
            if sent and self.closing:
                if not any(self.pending()):
                    return
                self.wake.set()  # more was queued while sending: go round again at once
            pause = self.flush_secs if sent else min(60.0, 2 * pause)

    def _send(self):
        """One pass over the queue; False if the store could not be reached."""
        with self.lock:
            metrics, jobs = list(self.metrics), list(self.jobs.items())
        try:
            self._beat()
            for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 per batch
                chunk = metrics[i:i + 1000]
                self._attempt(lambda: client().log_batch(self.run_id, metrics=chunk),
                              f"{len(chunk)} metrics")
                with self.lock:
                    del self.metrics[:len(chunk)]  # new metrics only ever join at the end
            for key, job in jobs:
                self._attempt(job[1], job[0], key)
                with self.lock:
                    if self.jobs.get(key) is job:  # not replaced by a newer upload meanwhile
                        del self.jobs[key]
        except Exception as e:  # only transient failures get here: keep everything, retry
            if self.outage is None:
                self.outage = describe_error(e)
                waiting = len(self.pending()[0])
                _say(f"warning: run {self.run_id}: tracking store unreachable ({self.outage}); "
                     f"training goes on, checkpoints stay on local disk, {waiting} metrics and "
                     f"{len(self.jobs)} uploads are kept and retried")
            return False
        if self.outage is not None:
            _say(f"run {self.run_id}: tracking store reachable again; queued metrics and "
                 f"uploads sent")
            self.outage = None
        return True

    def _beat(self):
        if self.heartbeat is None or time.monotonic() < self.next_beat:
            return
        from mlflow.entities import RunTag
        tags = [RunTag(k, v) for k, v in self.heartbeat().items()]
        self._attempt(lambda: client().log_batch(self.run_id, tags=tags), "the heartbeat")
        self.next_beat = time.monotonic() + self.heartbeat_secs

    def _attempt(self, fn, what, key=None):
        """fn(); a failure that retrying cannot cure is reported and dropped (and, for a queued
        upload, kept in `dropped`), so it cannot hold up everything queued behind it."""
        try:
            fn()
        except Exception as e:
            if is_transient(e):
                raise
            _say(f"warning: run {self.run_id}: could not log {what}, dropped: "
                 f"{describe_error(e)}")
            if key is not None:
                with self.lock:
                    self.dropped[key] = (what, describe_error(e))
        else:
            if key is not None:
                with self.lock:
                    self.dropped.pop(key, None)
