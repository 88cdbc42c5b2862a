"""The life of one training run in MLflow, shared by every trainer (pipeline/train_loop.py).

A run records `config.json` ({"model": ..., "train": ...}) and every setting as a param, logs
metrics and images through a background `Uploader`, and keeps two checkpoints,
`checkpoints/last.pt` and `checkpoints/best.pt`.

Crash safety: each checkpoint is first written locally (atomically) under
`<checkpoint_dir>/<run_id>/`, then uploaded in the background. A tracking-store outage therefore
never blocks training or loses a checkpoint, and a resume uses whichever readable copy of
`last.pt`, local or uploaded, has the later step (an upload cut short by a crash is skipped).
Metrics that could not be sent by the end of training are kept in `unsent_metrics.json` beside
the checkpoints and sent by the next resume.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

from pipeline import describe, distributed, tracking
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from core.errors import UserError

# How long the end of training waits for queued uploads when the store is slow or down.
UPLOAD_TIMEOUT_S = float(os.environ.get("PIPELINE_UPLOAD_TIMEOUT_S", "120"))
SCRIPTS = {"tokenizer": "train_vqvae.py", "prior": "train.py"}
UNSENT_METRICS = "unsent_metrics.json"


def recorded_config(stage, run_id, kind=None):
    """The config.json of a run to resume (checking that it is a `stage` run of `kind`)."""
    tracking.get_run(run_id, stage, flag="--resume_run_id", kind=kind)
    return tracking.load_json_artifact(run_id, "config.json", flag="--resume_run_id")


class TrainingRun:

    def __init__(self, stage, checkpoint_dir, run_id):
        self.stage, self.run_id = stage, run_id
        self.local_dir = Path(checkpoint_dir) / run_id
        self.uploader = tracking.Uploader(run_id)

    @classmethod
    def start(cls, stage, config, params, checkpoint_dir, experiment=None, run_name=None,
              tags=None, parent_run_id=None, description=None, datasets=()):
        """Create the run: its name, description (markdown), params (None values dropped;
        config.json keeps them), dataset inputs (describe.csv_inputs / codes_inputs), and the
        user, source script and git commit that MLflow's own start_run would record."""
        all_tags = describe.source_tags(tags)
        if description:
            all_tags[describe.NOTE_TAG] = description
        run_id = tracking.create_run(stage, experiment, run_name, all_tags, parent_run_id)
        tracking.log_params(run_id, describe.run_params(params))
        describe.log_inputs(run_id, datasets)
        tracking.log_json(run_id, config, "config.json")
        return cls(stage, checkpoint_dir, run_id)

    @classmethod
    def reopen(cls, stage, run_id, checkpoint_dir):
        """Reopen a run to resume it (after `recorded_config` has checked it)."""
        tracking.client().update_run(run_id, status="RUNNING")
        run = cls(stage, checkpoint_dir, run_id)
        run._queue_unsent_metrics()
        return run

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
        """Write checkpoints/<name> locally (atomically), then queue its upload."""
        path = self.local_dir / name
        save_checkpoint(checkpoint, path)
        self._upload(path)

    def _upload(self, path):
        self.uploader.submit(
            f"checkpoints/{path.name}",
            lambda: tracking.client().log_artifact(self.run_id, str(path), "checkpoints"),
            f"checkpoints/{path.name}")

    # resuming

    def restore(self, kind):
        """The newest readable `last.pt`, local or uploaded. A local copy newer than the uploaded
        one (the store was down, or the upload was cut short) is uploaded again."""
        copies, problems = {}, []
        local = self.local_dir / "last.pt"
        if local.is_file():
            try:
                copies["local"] = load_checkpoint(local, kind, where=str(local))
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
        source = max(copies, key=lambda k: copies[k]["step"])
        uploaded_step = copies["uploaded"]["step"] if "uploaded" in copies else -1
        if source == "local" and copies["local"]["step"] > uploaded_step:
            for name in ("last.pt", "best.pt"):
                if (self.local_dir / name).is_file():
                    self._upload(self.local_dir / name)
        print(f"resuming run {self.run_id} from step {copies[source]['step']} "
              f"({source} checkpoint)", file=sys.stderr)
        return copies[source]

    def _queue_unsent_metrics(self):
        path = self.local_dir / UNSENT_METRICS
        if not path.is_file():
            return
        try:
            rows = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"warning: ignoring unreadable {path}", file=sys.stderr)
            return
        for key, value, timestamp_ms, step in rows:
            self.uploader.log_metrics({key: value}, step, timestamp_ms)

    # the end

    def finish(self, status="FINISHED"):
        """Send what is queued and close the run. If the store cannot be reached, keep unsent
        metrics on disk and (for a finished training) fail with one line saying how to recover."""
        metrics, uploads = self.uploader.close(UPLOAD_TIMEOUT_S)
        unsent = self.local_dir / UNSENT_METRICS
        if metrics:
            unsent.parent.mkdir(parents=True, exist_ok=True)
            tmp = unsent.with_name(unsent.name + ".tmp")
            tmp.write_text(json.dumps([[m.key, m.value, m.timestamp, m.step] for m in metrics]))
            os.replace(tmp, unsent)
        elif unsent.is_file():
            unsent.unlink()
        problem = None
        if metrics or uploads:
            images = [u for u in uploads if u.startswith("image ")]
            what = ([u for u in uploads if u not in images]
                    + ([f"{len(images)} images"] if images else [])
                    + ([f"{len(metrics)} metrics"] if metrics else []))
            problem = f"{self.uploader.outage or 'timed out'}; not uploaded: {', '.join(what)}"
        else:
            try:
                tracking.end_run(self.run_id, status)
            except Exception as e:
                if tracking.store_failure(e) is None:
                    raise
                problem = f"could not close the run ({tracking.describe_error(e)})"
        if problem is None:
            return
        message = (f"run {self.run_id}: tracking store unreachable ({problem}). The checkpoints "
                   f"and metrics are kept in {self.local_dir}/; when the store is back, "
                   f"`python {SCRIPTS[self.stage]} --resume_run_id {self.run_id}` uploads them "
                   f"and closes the run")
        if status == "FINISHED":
            raise UserError(message)
        print(f"warning: {message}", file=sys.stderr)


def resume(ctx, stage, kind, run_id, checkpoint_dir, model, optimizer, generator):
    """Reopen a run on rank 0 and load its newest last.pt (a `kind` checkpoint) into model,
    optimizer and batch-order RNG on every rank; returns (the TrainingRun on rank 0 / None
    elsewhere, the checkpoint dict)."""
    run = distributed.on_main(ctx, lambda: TrainingRun.reopen(stage, run_id, checkpoint_dir))
    checkpoint = distributed.on_main(ctx, lambda: run.restore(kind))
    checkpoint = distributed.broadcast_checkpoint(ctx, checkpoint)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    generator.set_state(checkpoint["rng"])
    return run, checkpoint


def load_run_checkpoint(run_id, stage, kind, flag="--run_id", prefer="best.pt"):
    """Download and load a finished run's checkpoint (best.pt, falling back to last.pt)."""
    tracking.get_run(run_id, stage, flag=flag)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (prefer, "last.pt"):
            try:
                path = tracking.download_artifact(run_id, f"checkpoints/{name}", tmp, flag=flag)
            except UserError:
                continue
            return load_checkpoint(path, kind, where=f"{flag} {run_id} checkpoints/{name}")
    raise UserError(f"{flag} {run_id}: has no checkpoint (checkpoints/{prefer} or last.pt)")
