"""Crash safety: a training killed with SIGKILL or stopped by SIGTERM resumes in the same run
and finishes; one process owns a run; refused uploads, torn checkpoints and a full disk are
reported and recovered from."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_vqvae
from conftest import ROOT, TINY_PRIOR, TINY_VQVAE, run_main
from pipeline import runs, tracking
from pipeline.checkpoint import load_checkpoint
from core.errors import Terminated, UserError


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

    # With no local copy left (nor the previous one), a torn upload is a clear error.
    torn.write_bytes(torn.read_bytes()[:100])
    os.remove(Path("checkpoints") / run_id / "last.pt")
    os.remove(Path("checkpoints") / run_id / "last.prev.pt")
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


# one owner per run, SIGTERM

def metric_steps(run_id, key="train/lr"):
    return sorted(m.step for m in tracking.client().get_metric_history(run_id, key))


def test_a_live_run_has_one_owner_and_sigterm_stops_it_with_a_checkpoint(image_csv, store,
                                                                          tmp_path, capsys):
    folder = tmp_path / "ckpt"
    log = open(tmp_path / "owner.log", "w")
    owner = subprocess.Popen(
        [sys.executable, str(ROOT / "train_vqvae.py"), "--path_to_data", str(image_csv),
         *TINY_VQVAE, "--max_steps", "100000", "--checkpoint_every", "20", "--eval_every", "50",
         "--checkpoint_dir", str(folder)], cwd=store, stdout=log, stderr=log)
    give_up = time.monotonic() + 300
    while last_step(folder) < 20:
        assert owner.poll() is None, (tmp_path / "owner.log").read_text()[-2000:]
        assert time.monotonic() < give_up, "no checkpoint at step 20 in 300 s"
        time.sleep(0.02)
    (run_dir,) = folder.iterdir()
    run_id = run_dir.name

    # a second process is refused with one line: the run's tag names the owner
    second = run_script("train_vqvae.py", ["--resume_run_id", run_id], store)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    (line,) = [l for l in second.stderr.splitlines() if l.startswith("error:")]
    assert f"being trained by pid {owner.pid} on {socket.gethostname()} since" in line
    # and the lock beside the checkpoints refuses even a process that missed the tag
    with pytest.raises(UserError, match=f"pid {owner.pid} .*which holds .*owner.lock"):
        runs.Lease.take(run_id, run_dir)
    assert owner.poll() is None  # the owner goes on

    owner.send_signal(signal.SIGTERM)
    assert owner.wait(timeout=300) == 143
    err = (tmp_path / "owner.log").read_text()
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(",")[0])
    assert "Traceback" not in err and f"--resume_run_id {run_id}" in err.splitlines()[-1]
    assert tracking.client().get_run(run_id).info.status == "KILLED"
    assert load_checkpoint(run_dir / "last.pt")["step"] == stopped  # the step it reached
    uploaded = tracking.download_artifact(run_id, "checkpoints/last.pt", tmp_path / "dl")
    assert load_checkpoint(uploaded)["step"] == stopped
    assert not list(run_dir.glob("*.tmp"))
    assert metric_steps(run_id) == sorted(set(range(10, stopped + 1, 10)) | {stopped})

    capsys.readouterr()
    assert run_main(train_vqvae.main, ["--resume_run_id", run_id, "--max_steps",
                                       str(stopped + 15)]) == run_id
    assert f"from step {stopped} (local checkpoint)" in capsys.readouterr().err
    run = tracking.client().get_run(run_id)
    assert run.info.status == "FINISHED" and runs.OWNER_TAG not in run.data.tags
    # one value per step: nothing lost, nothing logged twice
    assert metric_steps(run_id) == sorted(set(range(10, stopped + 16, 10))
                                          | {stopped, stopped + 15})


def test_a_lease_is_taken_over_only_when_its_owner_is_gone(image_csv, store, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_id = run_main(train_vqvae.main, ["--path_to_data", str(image_csv), "--max_steps", "10",
                                         *TINY_VQVAE])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()

    def leave_lease(host, pid, heartbeat_age_s):  # as a process killed with -9 leaves it
        now = time.time()
        tracking.client().set_tag(run_id, runs.OWNER_TAG, json.dumps(
            {"host": host, "pid": int(pid), "since": now - 3600,
             "heartbeat": now - heartbeat_age_s}))
        tracking.client().update_run(run_id, status="RUNNING")

    leave_lease("gpu-node-7", 4242, 30)  # live on another host: refused before reading data
    with pytest.raises(UserError, match="being trained by pid 4242 on gpu-node-7 since"):
        train_vqvae.main(["--resume_run_id", run_id, "--max_steps", "20"])

    capsys.readouterr()
    leave_lease(socket.gethostname(), gone, 30)  # here, its pid is gone: taken over at once
    assert run_main(train_vqvae.main, ["--resume_run_id", run_id, "--max_steps", "20"]) == run_id
    err = capsys.readouterr().err
    assert f"taking over run {run_id} from pid {gone} on {socket.gethostname()}" in err
    assert f"pid {gone} is not running" in err

    leave_lease("gpu-node-7", 4242, 2 * runs.LEASE_TIMEOUT_S)  # silent for too long
    assert run_main(train_vqvae.main, ["--resume_run_id", run_id, "--max_steps", "30"]) == run_id
    assert "no heartbeat for 20 minutes" in capsys.readouterr().err
    assert tracking.client().get_run(run_id).info.status == "FINISHED"


# upload failures, unreadable checkpoints, a full disk

def refuse_checkpoints(monkeypatch, status=403):
    """The store answers `status` to every checkpoint upload."""
    import requests
    real = tracking.client().log_artifact

    def log_artifact(run_id, local_path, artifact_path=None):
        if artifact_path == "checkpoints":
            response = requests.Response()
            response.status_code = status
            raise requests.HTTPError(f"{status} Client Error: Forbidden", response=response)
        return real(run_id, local_path, artifact_path)

    monkeypatch.setattr(tracking.client(), "log_artifact", log_artifact)


def test_a_refused_checkpoint_upload_fails_the_run_and_a_resume_uploads_it(
        image_csv, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refuse_checkpoints(monkeypatch)
    with pytest.raises(UserError) as failure:
        train_vqvae.main(["--path_to_data", str(image_csv), "--max_steps", "20", "--eval_every",
                          "10", "--checkpoint_every", "10", *TINY_VQVAE])
    message = str(failure.value)
    run_id = message.split()[1].rstrip(":")
    local = Path("checkpoints") / run_id
    assert "refused" in message and "403" in message
    assert f"{local / 'best.pt'}, {local / 'last.pt'}" in message
    assert f"--resume_run_id {run_id}" in message
    assert tracking.client().get_run(run_id).info.status == "FAILED"  # not FINISHED
    assert "checkpoints" not in tracking.list_artifacts(run_id)

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert run_main(train_vqvae.main, ["--resume_run_id", run_id]) == run_id
    assert tracking.client().get_run(run_id).info.status == "FINISHED"
    for name in ("last.pt", "best.pt"):
        uploaded = tracking.download_artifact(run_id, f"checkpoints/{name}", tmp_path / name)
        assert load_checkpoint(uploaded)["step"] == load_checkpoint(local / name)["step"]


def test_a_model_is_built_from_a_verified_checkpoint_no_older_than_the_local_one(
        image_csv, store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_id = run_main(train_vqvae.main, ["--path_to_data", str(image_csv), "--max_steps", "20",
                                         "--eval_every", "10", "--checkpoint_every", "10",
                                         *TINY_VQVAE])
    local = Path("checkpoints") / run_id / "best.pt"
    newer = load_checkpoint(local)
    newer["step"] += 100  # as if a later best.pt had not been uploaded
    torch.save(newer, local)
    with pytest.raises(UserError, match=r"uploaded checkpoints/best.pt \(step \d+\) is older "
                                        r"than the local .*--resume_run_id"):
        runs.checkpoint_for_model(run_id, tmp_path / "a")
    local.unlink()
    torn = artifact_file(run_id, "checkpoints/best.pt")
    torn.write_bytes(torn.read_bytes()[:500])
    capsys.readouterr()
    path = runs.checkpoint_for_model(run_id, tmp_path / "b")
    assert path.name == "last.pt" and load_checkpoint(path)["step"] == 20
    assert "best.pt: not a readable checkpoint" in capsys.readouterr().err


def test_an_unreadable_best_pt_still_generates_and_a_double_corruption_still_resumes(
        chain, store, tmp_path, monkeypatch, capsys):
    import train as train_prior_script
    import transformer_generation
    monkeypatch.chdir(tmp_path)
    run_id = run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--max_steps", "20",
                                                "--eval_every", "10", "--checkpoint_every",
                                                "10", *TINY_PRIOR])
    best = artifact_file(run_id, "checkpoints/best.pt")
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    capsys.readouterr()
    run_main(transformer_generation.main, ["--run_id", run_id, "--num_samples", "2",
                                           "--no_decode", "--name", "fallback"])
    err = capsys.readouterr().err
    assert "checkpoints/best.pt: not a readable checkpoint" in err
    assert "using checkpoints/last.pt instead" in err

    # last.pt torn here and in the store: the previous local one (step 10) resumes
    local = Path("checkpoints") / run_id
    for torn in (local / "last.pt", artifact_file(run_id, "checkpoints/last.pt")):
        torn.write_bytes(torn.read_bytes()[:100])
    assert load_checkpoint(local / "last.prev.pt")["step"] == 10
    assert run_main(train_prior_script.main, ["--resume_run_id", run_id, "--max_steps",
                                              "30"]) == run_id
    assert "from step 10 (previous local checkpoint)" in capsys.readouterr().err
    assert load_checkpoint(local / "last.pt")["step"] == 30
    assert tracking.client().get_run(run_id).info.status == "FINISHED"


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(image_csv, store, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError) as failure:
        train_vqvae.main(["--path_to_data", str(image_csv), "--max_steps", "20", "--eval_every",
                          "10", "--checkpoint_every", "10", *TINY_VQVAE])
    message = str(failure.value)
    assert "could not write the checkpoint checkpoints/" in message
    assert "no space left on the device" in message and "MiB free in checkpoints/" in message
    (run_dir,) = Path("checkpoints").iterdir()
    assert not list(run_dir.glob("*.tmp"))
    run = tracking.client().get_run(run_dir.name)
    assert run.info.status == "FAILED"
    assert [m.step for m in tracking.client().get_metric_history(run_dir.name,
                                                                 "train/lr")] == [10]


def test_a_second_failure_while_closing_does_not_hide_the_first(image_csv, store, tmp_path,
                                                                monkeypatch, capsys):
    """The disk is full and the store does not take the metrics: the checkpoint's error is
    the one reported, the metrics that could not be kept are named, the run is closed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "save", no_space)
    write_json = runs._write_json
    monkeypatch.setattr(runs, "_write_json", lambda path, rows: (
        no_space() if path.name.startswith("unsent") else write_json(path, rows)))
    monkeypatch.setattr(runs, "UPLOAD_TIMEOUT_S", 0.5)
    monkeypatch.setattr(tracking.Uploader, "_send", lambda self: False)
    with pytest.raises(UserError, match="could not write the checkpoint"):
        train_vqvae.main(["--path_to_data", str(image_csv), "--max_steps", "20", "--eval_every",
                          "10", "--checkpoint_every", "10", *TINY_VQVAE])
    err = capsys.readouterr().err
    assert "could not keep" in err and "metrics in checkpoints/" in err and "they are lost" in err
    (run_dir,) = Path("checkpoints").iterdir()
    assert tracking.client().get_run(run_dir.name).info.status == "FAILED"


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(image_csv, store, tmp_path, monkeypatch):
    import pipeline.train_tokenizer as vqvae_trainer
    monkeypatch.chdir(tmp_path)
    real_step, calls = vqvae_trainer.apply_gradients, []
    handler = signal.getsignal(signal.SIGINT)

    def step_then_ctrl_c(*args):
        real_step(*args)
        calls.append(1)
        if len(calls) == 13:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(vqvae_trainer, "apply_gradients", step_then_ctrl_c)
    with pytest.raises(Terminated) as stop:
        train_vqvae.main(["--path_to_data", str(image_csv), "--max_steps", "40", "--eval_every",
                          "20", "--checkpoint_every", "20", *TINY_VQVAE])
    assert stop.value.signal == signal.SIGINT and "stopped by Ctrl-C at step 13" in str(stop.value)
    (run_dir,) = Path("checkpoints").iterdir()
    assert load_checkpoint(run_dir / "last.pt")["step"] == 13
    assert tracking.client().get_run(run_dir.name).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is handler  # handed back
