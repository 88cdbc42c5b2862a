"""The chain against a real `mlflow server` on loopback, and training through a server outage.

The server has a sqlite backend and a local artifact destination, like a small team's shared
server; the client only knows its http:// URI, so nothing here can fall back on a local store.
"""

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

import images_from_indexes
import quantize_dataset
import train as train_prior_script
import train_vqvae
import transformer_generation
import pipeline.train_tokenizer as vqvae_trainer
from conftest import TINY_PRIOR, TINY_VQVAE, run_main
from pipeline import runs, tracking
from pipeline.checkpoint import load_checkpoint
from pipeline.servers import MlflowServer, free_port
from core.errors import UserError


def use_store(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.reset_client()


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = MlflowServer(tmp_path / "server", free_port())
    srv.folder.mkdir()
    srv.start()
    use_store(monkeypatch, srv.uri)
    monkeypatch.chdir(tmp_path)
    yield srv
    srv.stop()
    monkeypatch.undo()
    tracking.reset_client()


def test_the_whole_chain_against_a_server(server, image_csv, tmp_path):
    vq = run_main(train_vqvae.main, ["--path_to_data", str(image_csv), "--max_steps", "40",
                                     "--eval_every", "20", "--checkpoint_every", "20",
                                     *TINY_VQVAE])
    run_main(quantize_dataset.main, ["--run_id", vq])
    prior = run_main(train_prior_script.main, ["--run_id", vq, "--max_steps", "10",
                                               "--eval_every", "5", *TINY_PRIOR])
    run_main(transformer_generation.main, ["--run_id", prior, "--num_samples", "4",
                                           "--name", "s", "--out_dir", str(tmp_path / "png")])
    run_main(images_from_indexes.main, ["--run_id", prior, "--indexes", "s",
                                        "--out_dir", str(tmp_path / "again")])

    assert len(list((tmp_path / "png").glob("sample_*.png"))) == 4
    assert len(list((tmp_path / "again").glob("sample_*.png"))) == 4
    for run_id in (vq, prior):
        run = tracking.client().get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), (run_id, run.info.artifact_uri)
    # The checkpoints live in the server's artifact destination, and are whole.
    stored = {p.relative_to(server.artifacts).as_posix(): p for p in server.artifacts.rglob("*.pt")}
    for run_id, kind in ((vq, "vqvae"), (prior, "prior")):
        last = [p for name, p in stored.items() if run_id in name and name.endswith("checkpoints/last.pt")]
        assert len(last) == 1, sorted(stored)
        assert load_checkpoint(last[0], kind)["step"] == (40 if kind == "vqvae" else 10)
    assert any(name.endswith("codes/train.npy") for name in
               (p.relative_to(server.artifacts).as_posix() for p in server.artifacts.rglob("*")))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_training_survives_a_server_outage_and_a_resume_uploads_everything(
        server, image_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while it is down
    monkeypatch.setattr(runs, "UPLOAD_TIMEOUT_S", 3.0)
    real_step = vqvae_trainer.apply_gradients
    calls = []

    def step_then_kill_server(*args):  # the server dies after the 15th step, mid-training
        real_step(*args)
        calls.append(1)
        if len(calls) == 15:
            server.stop()

    monkeypatch.setattr(vqvae_trainer, "apply_gradients", step_then_kill_server)
    args = ["--path_to_data", str(image_csv), "--max_steps", "40", "--eval_every", "10",
            "--checkpoint_every", "10", *TINY_VQVAE]
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(UserError) as failure:
        train_vqvae.main(args)
    message = str(failure.value)
    assert len(calls) == 40  # training went on to the end
    assert "unreachable" in message and "are kept in" in message
    run_id = message.split()[1].rstrip(":")
    assert f"--resume_run_id {run_id}" in message
    assert err.getvalue().count("tracking store unreachable") == 1  # one warning, not one per step
    local = Path("checkpoints") / run_id
    assert load_checkpoint(local / "last.pt", "vqvae")["step"] == 40
    assert (local / runs.UNSENT_METRICS).is_file()

    monkeypatch.setattr(vqvae_trainer, "apply_gradients", real_step)
    server.start()
    assert run_main(train_vqvae.main, ["--resume_run_id", run_id]) == run_id
    assert tracking.client().get_run(run_id).info.status == "FINISHED"
    with_steps = lambda key: [m.step for m in tracking.client().get_metric_history(run_id, key)]
    assert {20, 30, 40} <= set(with_steps("train/vq_loss"))  # logged while the server was down
    assert 40 in with_steps("val/psnr_db")
    assert not (local / runs.UNSENT_METRICS).exists()
    uploaded = tracking.download_artifact(run_id, "checkpoints/last.pt", tmp_path / "dl")
    assert load_checkpoint(uploaded, "vqvae")["step"] == 40


def test_an_unreachable_server_is_one_line_before_any_work(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    result = subprocess.run([sys.executable, str(Path(train_vqvae.__file__)), "--resume_run_id",
                             "0123456789abcdef0123456789abcdef"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: ") and "cannot connect to http://127.0.0.1:" in lines[0]
