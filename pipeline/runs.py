"""The life of one training run in MLflow, shared by the VQ-VAE and prior trainers.

A run records `config.json` ({"model": ..., "train": ...}) and every setting as a param, logs
metrics through a batching `MetricLogger`, and keeps two checkpoints, `checkpoints/last.pt` and
`checkpoints/best.pt`. Each checkpoint is first written locally (atomically) under
`<checkpoint_dir>/<run_id>/`, then uploaded, so a tracking-store outage never loses a checkpoint
and a resume can use whichever copy is newer.
"""

import sys
import tempfile
from pathlib import Path

from pipeline import tracking
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.errors import UserError


class TrainingRun:

    def __init__(self, stage, checkpoint_dir, run_id):
        self.stage, self.run_id = stage, run_id
        self.local_dir = Path(checkpoint_dir) / run_id
        self.metrics = tracking.MetricLogger(run_id)

    @classmethod
    def start(cls, stage, config, params, checkpoint_dir, experiment=None, run_name=None,
              tags=None, parent_run_id=None):
        run_id = tracking.create_run(stage, experiment, run_name, tags, parent_run_id)
        tracking.log_params(run_id, params)
        tracking.log_json(run_id, config, "config.json")
        return cls(stage, checkpoint_dir, run_id)

    @classmethod
    def reopen(cls, stage, run_id, checkpoint_dir):
        """Reopen a run to resume it; returns (run, its recorded config.json)."""
        tracking.get_run(run_id, stage, flag="--resume_run_id")
        config = tracking.load_json_artifact(run_id, "config.json", flag="--resume_run_id")
        tracking.client().update_run(run_id, status="RUNNING")
        return cls(stage, checkpoint_dir, run_id), config

    def save(self, name, checkpoint):
        """Write checkpoints/<name> locally, then upload it (retrying if the store is down)."""
        path = self.local_dir / name
        save_checkpoint(checkpoint, path)
        try:
            tracking.log_artifact(self.run_id, path, "checkpoints")
        except Exception:
            print(f"warning: checkpoint kept locally at {path}; upload it later with "
                  f"`mlflow artifacts log-artifact` or resume to retry", file=sys.stderr)

    def load_last(self, kind):
        """The newest of the uploaded and the local `last.pt` (by step), or UserError."""
        where = f"run {self.run_id} checkpoints/last.pt"
        candidates = []
        local = self.local_dir / "last.pt"
        if local.is_file():
            candidates.append(load_checkpoint(local, kind, where=str(local)))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = tracking.download_artifact(self.run_id, "checkpoints/last.pt", tmp,
                                                  flag="--resume_run_id")
                candidates.append(load_checkpoint(path, kind, where=where))
            except UserError:
                if not candidates:
                    raise
        return max(candidates, key=lambda c: c["step"])

    def restore(self, kind, model, optimizer, generator):
        """Load the newest last.pt into model, optimizer and batch-order RNG;
        returns (step, best_val_loss)."""
        checkpoint = self.load_last(kind)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        generator.set_state(checkpoint["rng"])
        print(f"resuming run {self.run_id} from step {checkpoint['step']}", file=sys.stderr)
        return checkpoint["step"], checkpoint["best_val_loss"]

    def finish(self, status="FINISHED"):
        self.metrics.flush()
        tracking.end_run(self.run_id, status)


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
