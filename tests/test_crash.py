"""Crash safety: a training killed with SIGKILL resumes in the same run and finishes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_vqvae
from conftest import ROOT, TINY_PRIOR, TINY_VQVAE, run_main
from pipeline import tracking
from pipeline.checkpoint import load_checkpoint
from core.errors import UserError


def last_step(folder):
    """Step of the newest local last.pt under folder/<run_id>/, or -1."""
    for path in Path(folder).glob("*/last.pt"):
        return load_checkpoint(path)["step"]  # written by rename, so never half-written
    return -1


def run_script(script, args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("stage", ["vqvae", "prior"])
def test_sigkill_mid_training_then_resume_with_only_the_run_id(stage, chain, store, tmp_path):
    script = "train_vqvae.py" if stage == "vqvae" else "train.py"
    data = (["--path_to_data", str(chain["csv"]), *TINY_VQVAE] if stage == "vqvae"
            else ["--run_id", chain["vqvae"], *TINY_PRIOR])
    folder = tmp_path / "ckpt"
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / script), *data, "--max_steps", "800",
         "--checkpoint_every", "100", "--eval_every", "200", "--checkpoint_dir", str(folder)],
        cwd=store, stdout=log, stderr=log)
    # Wait (on the checkpoint, not on a clock) until two intervals are done, then SIGKILL.
    give_up = time.monotonic() + 300
    while last_step(folder) < 200:
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        assert time.monotonic() < give_up, "no checkpoint at step 200 in 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    (run_dir,) = folder.iterdir()
    run_id, killed_at = run_dir.name, last_step(folder)
    assert 200 <= killed_at < 800  # really cut short

    result = run_script(script, ["--resume_run_id", run_id], store)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"run_id={run_id}"
    resumed_from = int(result.stderr.split("from step ")[1].split()[0])
    assert resumed_from >= killed_at  # at most one --checkpoint_every interval lost

    run = tracking.client().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert load_checkpoint(run_dir / "last.pt")["step"] == 800
    uploaded = tracking.download_artifact(run_id, "checkpoints/last.pt", tmp_path / "dl")
    assert load_checkpoint(uploaded)["step"] == 800
    # train/lr: both trainers log it, with their losses, every 10 steps
    steps = sorted({m.step for m in tracking.client().get_metric_history(run_id, "train/lr")})
    assert steps[-1] == 800 and set(range(resumed_from + 10, 801, 10)) <= set(steps)
    assert len(tracking.client().search_runs([run.info.experiment_id],
                                             f"attributes.run_id = '{run_id}'")) == 1


def artifact_file(run_id, path):
    """The stored file behind an artifact of the test's local (sqlite + folder) store."""
    root = tracking.client().get_run(run_id).info.artifact_uri.removeprefix("file://")
    return Path(root) / path


def test_an_upload_cut_short_is_skipped_for_the_local_copy(store, image_csv, tmp_path,
                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--path_to_data", str(image_csv), "--max_steps", "20", "--eval_every", "10",
            "--checkpoint_every", "10", *TINY_VQVAE]
    run_id = run_main(train_vqvae.main, args)
    torn = artifact_file(run_id, "checkpoints/last.pt")
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a crash mid-upload
    capsys.readouterr()
    assert run_main(train_vqvae.main, ["--resume_run_id", run_id, "--max_steps", "30"]) == run_id
    err = capsys.readouterr().err
    assert "skipping an unusable copy" in err and "from step 20 (local" in err
    assert load_checkpoint(torn)["step"] == 30  # the resumed run uploaded a whole one again

    # With no local copy left, a torn upload is a clear error, not a crash.
    torn.write_bytes(torn.read_bytes()[:100])
    os.remove(Path("checkpoints") / run_id / "last.pt")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        train_vqvae.main(["--resume_run_id", run_id, "--max_steps", "40"])


def test_a_run_killed_before_its_first_checkpoint_says_so(store, image_csv, tmp_path,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_id = run_main(train_vqvae.main, ["--path_to_data", str(image_csv), "--max_steps", "2",
                                         *TINY_VQVAE])
    for name in ("last.pt", "best.pt"):  # as if killed before any checkpoint was written
        artifact_file(run_id, f"checkpoints/{name}").unlink()
        (Path("checkpoints") / run_id / name).unlink()
    with pytest.raises(UserError, match="has no checkpoints/last.pt .*start a new training"):
        train_vqvae.main(["--resume_run_id", run_id, "--max_steps", "4"])
