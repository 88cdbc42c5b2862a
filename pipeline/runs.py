"""The life of one training run in MLflow, shared by every trainer (pipeline/train_loop.py).

A run records `config.json` ({"model": ..., "train": ...}) and every setting as a param, logs
metrics and images through a background `Uploader`, and keeps two checkpoints,
`checkpoints/last.pt` and `checkpoints/best.pt`.

Crash safety: each checkpoint is first written locally (atomically, flushed to disk) under
`<checkpoint_dir>/<run_id>/`, then uploaded in the background; the `last.pt` it replaces is
kept there as `last.prev.pt`. A tracking-store outage therefore never blocks training or loses
a checkpoint, and a resume uses whichever readable copy of `last.pt` (local, uploaded, or the
local previous one) has the latest step (a torn upload or file is skipped). Metrics that could
not be sent by the end of training are kept in `unsent_metrics.json` beside the checkpoints,
the names of checkpoints not uploaded in `unsent_uploads.json`; the next resume sends both. A
checkpoint upload the store refuses (401, 403, 413) fails the run, naming the local files.

One owner per run: a process training a run holds its lease, an OS lock on
`<checkpoint_dir>/<run_id>/owner.lock` (with `owner.json`: host, pid, since) and the run's tag
`pipeline.owner` (the same, with a heartbeat the uploader refreshes every minute). A second
process asked to resume a live run stops with one line naming the owner; a lease whose process
is gone (a pid not running on this host, or no heartbeat for PIPELINE_LEASE_TIMEOUT_S, 10
minutes, from another host) is taken over with a message.
"""

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from pipeline import describe, distributed, tracking
from pipeline.checkpoint import (UnreadableCheckpoint, load_checkpoint, previous_name,
                                 save_checkpoint)
from core.errors import UserError

# How long the end of training waits for queued uploads when the store is slow or down.
UPLOAD_TIMEOUT_S = float(os.environ.get("PIPELINE_UPLOAD_TIMEOUT_S", "120"))
# After how long without a heartbeat another host's lease on a run counts as abandoned.
LEASE_TIMEOUT_S = float(os.environ.get("PIPELINE_LEASE_TIMEOUT_S", "600"))
HEARTBEAT_S = 60.0
SCRIPTS = {"tokenizer": "train_vqvae.py", "prior": "train.py"}
UNSENT_METRICS = "unsent_metrics.json"
UNSENT_UPLOADS = "unsent_uploads.json"
OWNER_TAG = "pipeline.owner"


def recorded_config(stage, run_id, kind=None):
    """The config.json of a run to resume (checking that it is a `stage` run of `kind`, and
    that no live process is training it: said before any data is read)."""
    run = tracking.get_run(run_id, stage, flag="--resume_run_id", kind=kind)
    owner = live_owner(run)
    if owner:
        raise UserError(busy_message(run_id, owner))
    return tracking.load_json_artifact(run_id, "config.json", flag="--resume_run_id")


# the lease: one process trains a run at a time

def _owner_record():
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now}


def _pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process (or no such check here)
        return True
    return True


def _when(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def describe_owner(owner):
    """'pid 123 on host-a since 2026-01-02 10:00:00 (last heartbeat 40 s ago)'."""
    if not owner:
        return "another process"
    text = f"pid {owner.get('pid')} on {owner.get('host')}"
    if owner.get("since"):
        text += f" since {_when(owner['since'])}"
    if owner.get("heartbeat"):
        text += f" (last heartbeat {max(0, time.time() - owner['heartbeat']):.0f} s ago)"
    return text


def _parse_owner(text):
    try:
        owner = json.loads(text or "")
    except (json.JSONDecodeError, TypeError):
        return None
    return owner if isinstance(owner, dict) and "pid" in owner else None


def stale_reason(owner):
    """Why the lease `owner` no longer holds (its pid is not running here, or its heartbeat
    stopped), or None while it does. This very process's own lease counts as stale: it is
    an earlier run object of this process that did not finish."""
    age = time.time() - float(owner.get("heartbeat") or 0)
    if owner.get("host") == socket.gethostname():
        if owner.get("pid") == os.getpid():
            return "this process"
        if not _pid_running(int(owner.get("pid", 0))):
            return f"pid {owner.get('pid')} is not running"
    if age > LEASE_TIMEOUT_S:
        return f"no heartbeat for {age / 60:.0f} minutes"
    return None


def live_owner(run):
    """The owner record of a RUNNING run whose lease still holds, else None."""
    if run.info.status != "RUNNING":
        return None
    owner = _parse_owner(run.data.tags.get(OWNER_TAG))
    return owner if owner and stale_reason(owner) is None else None


def busy_message(run_id, owner, lock=None):
    return (f"--resume_run_id {run_id}: the run is being trained by {describe_owner(owner)}"
            + (f", which holds {lock}" if lock else "")
            + "; stop that process first (a lease whose process is gone is taken over: on this "
              f"host at once, from another host after {LEASE_TIMEOUT_S / 60:.0f} minutes "
              f"without a heartbeat)")


_held = {}  # lock path -> open file, the leases this process holds


class Lease:
    """This process's ownership of a training run: an OS lock on <local_dir>/owner.lock (which
    the OS drops when the process dies, however it dies), owner.json beside it, and the run's
    tag OWNER_TAG, whose heartbeat `tags()` refreshes."""

    def __init__(self, run_id, local_dir, owner, handle):
        self.run_id, self.local_dir, self.owner, self.handle = run_id, local_dir, owner, handle

    @classmethod
    def take(cls, run_id, local_dir, run=None, owner=None):
        """Take the lease of `run_id` (`run`: the MLflow run when it exists already, whose
        owner tag is checked and rewritten; `owner`: the record a new run was tagged with).
        UserError if a live process holds it."""
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        lock = local_dir / "owner.lock"
        handle = _lock(lock)
        if handle is None:
            try:
                owner = _parse_owner((local_dir / "owner.json").read_text())
            except OSError:
                owner = None
            raise UserError(busy_message(run_id, owner, lock))
        previous = _parse_owner(run.data.tags.get(OWNER_TAG)) if run is not None else None
        if previous and run.info.status == "RUNNING":
            reason = stale_reason(previous)
            if reason is None:
                _unlock(handle)
                raise UserError(busy_message(run_id, previous))
            if reason != "this process":
                print(f"taking over run {run_id} from {describe_owner(previous)}: {reason}",
                      file=sys.stderr)
        lease = cls(run_id, local_dir, owner or _owner_record(), handle)
        _write_json(local_dir / "owner.json", lease.owner)
        if run is not None:
            tracking.client().set_tag(run_id, OWNER_TAG, json.dumps(lease.owner))
        return lease

    def tags(self):
        """The owner tag with a fresh heartbeat (sent by the uploader every HEARTBEAT_S)."""
        self.owner["heartbeat"] = time.time()
        return {OWNER_TAG: json.dumps(self.owner)}

    def release(self, store=True):
        """Give the lease up: the lock, and (store=True) the run's tag."""
        if self.handle is not None:
            _unlock(self.handle)
            self.handle = None
        if store:
            try:
                tracking.client().delete_tag(self.run_id, OWNER_TAG)
            except Exception:  # a tag left behind is harmless: its pid is gone
                pass


def _lock(path):
    """An open file holding an exclusive OS lock on `path`, or None if another process holds
    it. A lock this process already holds (a run object that did not finish) is handed over."""
    key = str(Path(path).resolve())
    if key in _held:
        return _held[key]
    handle = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the owner tag alone guards the run
        _held[key] = handle
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    _held[key] = handle
    return handle


def _unlock(handle):
    for key, held in list(_held.items()):
        if held is handle:
            del _held[key]
    handle.close()  # closing the file drops its lock


def _write_json(path, obj):
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class TrainingRun:

    def __init__(self, stage, checkpoint_dir, run_id, lease):
        self.stage, self.run_id, self.lease = stage, run_id, lease
        self.local_dir = Path(checkpoint_dir) / run_id
        self.uploader = tracking.Uploader(run_id, heartbeat=lease.tags, heartbeat_secs=HEARTBEAT_S)

    @classmethod
    def start(cls, stage, config, params, checkpoint_dir, experiment=None, run_name=None,
              tags=None, parent_run_id=None, description=None, datasets=()):
        """Create the run: its name, description (markdown), params (None values dropped;
        config.json keeps them), dataset inputs (describe.csv_inputs / codes_inputs), and the
        user, source script and git commit that MLflow's own start_run would record."""
        all_tags = describe.source_tags(tags)
        if description:
            all_tags[describe.NOTE_TAG] = description
        owner = _owner_record()
        all_tags[OWNER_TAG] = json.dumps(owner)
        run_id = tracking.create_run(stage, experiment, run_name, all_tags, parent_run_id)
        lease = Lease.take(run_id, Path(checkpoint_dir) / run_id, owner=owner)  # a new run
        tracking.log_params(run_id, describe.run_params(params))
        describe.log_inputs(run_id, datasets)
        tracking.log_json(run_id, config, "config.json")
        return cls(stage, checkpoint_dir, run_id, lease)

    @classmethod
    def reopen(cls, stage, run_id, checkpoint_dir):
        """Take the lease of a run to resume (after `recorded_config` has checked it) and queue
        what an earlier process could not send; `running()` marks it RUNNING once its
        checkpoint has loaded."""
        lease = Lease.take(run_id, Path(checkpoint_dir) / run_id, tracking.client().get_run(run_id))
        run = cls(stage, checkpoint_dir, run_id, lease)
        run._queue_unsent()
        return run

    def running(self):
        tracking.client().update_run(self.run_id, status="RUNNING")

    def abandon(self):
        """Let go of a run that will not train after all (its checkpoint did not load)."""
        self.uploader.close(0)
        self.lease.release(store=False)

    # logging: all of it only queues, so a slow or unreachable store never stalls training

    def log_metrics(self, metrics, step):
        self.uploader.log_metrics(metrics, step)

    def log_image(self, image, key, step):
        """A PIL image under `key` at `step` (the run page's image card and its step slider)."""
        name = tracking.step_image_name(key, step)
        self.uploader.submit(
            f"image:{key}:{step}",
            lambda: tracking.log_step_image(self.run_id, image, key, step, name),
            f"image '{key}' at step {step}")

    def save(self, name, checkpoint):
        """Write checkpoints/<name> locally (atomically; the last.pt it replaces is kept as
        last.prev.pt), then queue its upload."""
        path = self.local_dir / name
        save_checkpoint(checkpoint, path, keep_previous=name == "last.pt")
        self._upload(path)

    def _upload(self, path):
        self.uploader.submit(
            f"checkpoints/{path.name}",
            lambda: tracking.client().log_artifact(self.run_id, str(path), "checkpoints"),
            f"checkpoints/{path.name}")

    def not_uploaded(self):
        """{checkpoint file name: why} for the checkpoints whose newest version is not in the
        store: still queued, or refused by it."""
        _, queued = self.uploader.pending()
        with self.uploader.lock:
            refused = dict(self.uploader.dropped)
        names = {what.split("/", 1)[1]: "not sent" for what in queued
                 if what.startswith("checkpoints/")}
        names.update({key.split("/", 1)[1]: reason for key, (_, reason) in refused.items()
                      if key.startswith("checkpoints/")})
        return names

    # resuming

    def restore(self, kind):
        """The newest readable `last.pt`: local, uploaded, or the local previous one
        (last.prev.pt, for when both others are unreadable). A local copy newer than the
        uploaded one (the store was down, or the upload was cut short) is uploaded again."""
        copies, problems = {}, []
        local, previous = self.local_dir / "last.pt", previous_name(self.local_dir / "last.pt")
        for source, path in (("local", local), ("previous local", previous)):
            if path.is_file():
                try:
                    copies[source] = load_checkpoint(path, kind, where=str(path))
                except UserError as e:
                    problems.append(str(e))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = tracking.download_artifact(self.run_id, "checkpoints/last.pt", tmp,
                                                  flag="--resume_run_id")
                copies["uploaded"] = load_checkpoint(
                    path, kind, where=f"run {self.run_id} checkpoints/last.pt")
            except UserError as e:
                problems.append(str(e))
        problems = [p for p in problems if "has no artifact" not in p]  # absent is no problem
        if not copies:
            raise UserError("; ".join(problems) or
                            f"--resume_run_id {self.run_id}: the run has no checkpoints/last.pt "
                            f"(it stopped before its first checkpoint); start a new training")
        for problem in problems:
            print(f"warning: skipping an unusable copy: {problem}", file=sys.stderr)
        # the latest step; on a tie the local last.pt, then the uploaded one
        order = ("local", "uploaded", "previous local")
        source = max(copies, key=lambda k: (copies[k]["step"], -order.index(k)))
        uploaded_step = copies["uploaded"]["step"] if "uploaded" in copies else -1
        if source == "previous local":
            if local.is_file():  # unreadable: keep it aside, so the next save does not make
                os.replace(local, local.with_name("last.pt.unreadable"))  # it the previous
            os.replace(previous, local)  # the resumed run's last.pt (uploaded below)
        if source != "uploaded" and copies[source]["step"] > uploaded_step:
            for name in ("last.pt", "best.pt"):
                if (self.local_dir / name).is_file():
                    self._upload(self.local_dir / name)
        print(f"resuming run {self.run_id} from step {copies[source]['step']} "
              f"({source} checkpoint)", file=sys.stderr)
        return copies[source]

    def _queue_unsent(self):
        """Queue the metrics and checkpoint uploads an earlier process of this run could not
        send (unsent_metrics.json, unsent_uploads.json)."""
        path = self.local_dir / UNSENT_METRICS
        if path.is_file():
            try:
                rows = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                print(f"warning: ignoring unreadable {path}", file=sys.stderr)
                rows = []
            for key, value, timestamp_ms, step in rows:
                self.uploader.log_metrics({key: value}, step, timestamp_ms)
        path = self.local_dir / UNSENT_UPLOADS
        if path.is_file():
            try:
                names = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                names = ["last.pt", "best.pt"]
            for name in names:
                if (self.local_dir / name).is_file():
                    self._upload(self.local_dir / name)

    # the end

    def finish(self, status="FINISHED"):
        """Send what is queued and close the run with `status`. What could not be sent is kept
        on disk (metrics in unsent_metrics.json, the names of checkpoints in
        unsent_uploads.json) for the next resume to send. A checkpoint the store refused makes
        a finished training FAILED. A finished training that did not get everything into the
        store fails with one line saying how to recover; for a training that stopped otherwise
        (FAILED, KILLED) that line is a warning, so that it never hides why it stopped."""
        finished, problems = status == "FINISHED", []
        try:
            metrics, uploads = self.uploader.close(UPLOAD_TIMEOUT_S)
            missing = self.not_uploaded()
        except Exception as e:  # nothing here may hide the error that ended the training
            metrics, uploads, missing = [], [], {}
            problems.append(f"could not close its uploads ({type(e).__name__}: {e})")
        problems += self._keep(UNSENT_METRICS,
                               [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                               f"{len(metrics)} metrics")
        problems += self._keep(UNSENT_UPLOADS, sorted(missing), "the list of checkpoints to upload")
        refused = {name: why for name, why in missing.items() if why != "not sent"}
        if refused and finished:
            status = "FAILED"  # its checkpoints are not all in the store
        # A finished training with something unsent stays open until a resume has sent it; a
        # stopped one is closed now if the store answers (its resume sends the rest).
        closed = False
        if not (metrics or uploads) or not finished:
            if (metrics or uploads) and self.uploader.outage is not None:
                problems.append("could not close the run (the store is unreachable)")
            else:
                try:
                    tracking.end_run(self.run_id, status)
                    closed = True
                except Exception as e:
                    reason = (tracking.describe_error(e) if tracking.store_failure(e) else
                              f"{type(e).__name__}: {e}")
                    problems.append(f"could not close the run ({reason})")
        try:
            self.lease.release(store=closed)
        except Exception as e:
            problems.append(f"could not release its lease ({type(e).__name__}: {e})")
        message = None
        if refused:
            files = ", ".join(str(self.local_dir / name) for name in sorted(refused))
            message = (f"run {self.run_id}: the tracking store refused the checkpoint upload "
                       f"({'; '.join(sorted(set(refused.values())))}); the run is {status}, "
                       f"its checkpoints are kept in {files}: once the store accepts them, "
                       f"`python {SCRIPTS[self.stage]} --resume_run_id {self.run_id}` uploads "
                       f"them")
        elif metrics or uploads:
            images = [u for u in uploads if u.startswith("image ")]
            what = ([u for u in uploads if u not in images]
                    + ([f"{len(images)} images"] if images else [])
                    + ([f"{len(metrics)} metrics"] if metrics else []))
            message = (f"run {self.run_id}: tracking store unreachable "
                       f"({self.uploader.outage or 'timed out'}; not uploaded: "
                       f"{', '.join(what)}). The checkpoints and metrics are kept in "
                       f"{self.local_dir}/; when the store is back, `python "
                       f"{SCRIPTS[self.stage]} --resume_run_id {self.run_id}` uploads them and "
                       f"closes the run")
        elif problems and finished:
            message = (f"run {self.run_id}: {'; '.join(problems)}; `python "
                       f"{SCRIPTS[self.stage]} --resume_run_id {self.run_id}` closes it")
            problems = []
        for problem in problems:
            print(f"warning: run {self.run_id}: {problem}", file=sys.stderr)
        if message is None:
            return
        if finished:
            raise UserError(message)
        print(f"warning: {message}", file=sys.stderr)

    def _keep(self, name, rows, what):
        """Write `rows` to <local_dir>/<name> (or remove the file when there are none);
        -> [a problem] if that failed (a full disk), else []."""
        path = self.local_dir / name
        try:
            if rows:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_json(path, rows)
            elif path.is_file():
                path.unlink()
        except OSError as e:
            return [f"could not keep {what} in {path} ({e.strerror or e}); "
                    + ("they are lost" if what.endswith("metrics") else "resume to upload them")]
        return []


def resume(ctx, stage, kind, run_id, checkpoint_dir, model, optimizer, generator):
    """Reopen a run on rank 0 and load its newest last.pt (a `kind` checkpoint) into model,
    optimizer and batch-order RNG on every rank; returns (the TrainingRun on rank 0 / None
    elsewhere, the checkpoint dict)."""
    run = distributed.on_main(ctx, lambda: TrainingRun.reopen(stage, run_id, checkpoint_dir))

    def restore():
        try:
            checkpoint = run.restore(kind)
        except BaseException:
            run.abandon()
            raise
        run.running()
        return checkpoint

    checkpoint = distributed.on_main(ctx, restore)
    checkpoint = distributed.broadcast_checkpoint(ctx, checkpoint)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    generator.set_state(checkpoint["rng"])
    return run, checkpoint


def load_run_checkpoint(run_id, stage, kind, flag="--run_id", prefer="best.pt"):
    """Download and load a finished run's checkpoint: best.pt, falling back to last.pt (with a
    warning when best.pt is there but torn or not a checkpoint)."""
    tracking.get_run(run_id, stage, flag=flag)
    with tempfile.TemporaryDirectory() as tmp:
        return _readable_checkpoint(run_id, tmp, kind, flag, prefer)[1]


def _readable_checkpoint(run_id, folder, kind, flag, prefer="best.pt"):
    """(path, checkpoint) of the first of checkpoints/<prefer>, last.pt that downloads to
    `folder` and loads weights-only."""
    unreadable = None
    for name in dict.fromkeys((prefer, "last.pt")):
        try:
            path = tracking.download_artifact(run_id, f"checkpoints/{name}", folder, flag=flag)
        except UserError:
            continue
        try:
            checkpoint = load_checkpoint(path, kind, where=f"{flag} {run_id} checkpoints/{name}")
        except UnreadableCheckpoint as e:
            unreadable = unreadable or e
            continue
        if unreadable is not None:
            print(f"warning: {unreadable}; using checkpoints/{name} instead", file=sys.stderr)
        return path, checkpoint
    if unreadable is not None:
        raise unreadable
    raise UserError(f"{flag} {run_id}: has no checkpoint (checkpoints/{prefer} or last.pt)")


def checkpoint_for_model(run_id, folder, kind=None):
    """The local path of the checkpoint an MLflow Model of run `run_id` is built from: its
    best.pt (last.pt if best.pt is unreadable), downloaded to `folder` and loaded back
    weights-only. Refused if the training's own local copy (under its --checkpoint_dir) is
    newer: the store then holds a stale one, whose newer version did not upload."""
    path, checkpoint = _readable_checkpoint(run_id, folder, kind, "run")
    run = tracking.client().get_run(run_id)
    local_dir = run.data.params.get("checkpoint_dir")
    local = Path(local_dir) / run_id / path.name if local_dir else None
    if local is not None and local.is_file():
        try:
            newer = load_checkpoint(local, kind).get("step", -1)
        except UserError:
            newer = -1  # an unreadable local copy is no newer version
        if newer > checkpoint.get("step", -1):
            raise UserError(
                f"run {run_id}: its uploaded checkpoints/{path.name} (step "
                f"{checkpoint.get('step')}) is older than the local {local} (step {newer}), "
                f"whose upload did not go through; `python "
                f"{SCRIPTS.get(tracking.stage_of(run)[0], 'train.py')} --resume_run_id "
                f"{run_id}` uploads it. No model logged")
    return path
