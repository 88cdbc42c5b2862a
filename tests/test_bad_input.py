"""Every script meets bad input with one line on stderr, exit status 2, and no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import images_from_indexes
import quantize_dataset
import train as train_prior_script
import train_vqvae
import transformer_generation
from conftest import ROOT, TINY_PRIOR, TINY_VQVAE, run_main
from pipeline import tracking
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import run_cli


def cli_error(main, argv, capsys):
    """Run the script's entry point as its __main__ does; return its one-line error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def bare_run(stage, tags=None):
    run_id = tracking.create_run(stage, tags=tags)
    tracking.end_run(run_id)
    return run_id


def test_missing_csv_as_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_vqvae.py"), "--path_to_data",
                             str(tmp_path / "nope.csv")], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.csv'}: no such CSV file or folder"
    assert not (tmp_path / "m.db").exists() or "Traceback" not in result.stderr


@pytest.mark.parametrize("content,match", [
    ("", "the CSV is empty"),
    ("image_path\n", "header but no rows"),
    ("file\na.png\n", "no 'image_path' column"),
    ("image_path\nmissing.png\n", "row 1: image .*missing.png' does not exist"),
])
def test_bad_csv_fails_before_a_run_is_created(store, tmp_path, capsys, content, match):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    before = len(tracking.client().search_runs([tracking.experiment_id()]))
    message = cli_error(train_vqvae.main, ["--path_to_data", str(csv), *TINY_VQVAE], capsys)
    assert str(csv) in message
    import re
    assert re.search(match, message), message
    assert len(tracking.client().search_runs([tracking.experiment_id()])) == before


def test_unknown_run_id(store, capsys):
    for main, flag in ((quantize_dataset.main, "--run_id"), (train_prior_script.main, "--run_id"),
                       (transformer_generation.main, "--run_id"),
                       (images_from_indexes.main, "--run_id"),
                       (train_vqvae.main, "--resume_run_id")):
        message = cli_error(main, [flag, "0123456789abcdef"], capsys)
        assert "0123456789abcdef: no such MLflow run" in message


def test_wrong_stage_run_ids(chain, capsys):
    assert "is a 'prior' run, expected a 'tokenizer' run" in cli_error(
        quantize_dataset.main, ["--run_id", chain["prior"]], capsys)
    assert "is a 'tokenizer' run, expected a 'prior' run" in cli_error(
        transformer_generation.main, ["--run_id", chain["vqvae"]], capsys)
    assert "expected a 'tokenizer' run" in cli_error(
        train_prior_script.main, ["--run_id", chain["prior"]], capsys)
    assert "expected a 'tokenizer' run" in cli_error(
        images_from_indexes.main, ["--tokenizer_run_id", chain["prior"], "--indexes_path",
                                   "x.npy"], capsys)
    assert "is a 'tokenizer' run, expected a 'prior' run" in cli_error(
        train_prior_script.main, ["--resume_run_id", chain["vqvae"]], capsys)


def test_missing_artifacts(store, capsys):
    empty_vqvae = bare_run("tokenizer", {tracking.TOKENIZER_TAG: "vqvae"})
    assert "has no checkpoint" in cli_error(quantize_dataset.main, ["--run_id", empty_vqvae], capsys)
    assert "has no codes/*.npy" in cli_error(train_prior_script.main, ["--run_id", empty_vqvae], capsys)
    empty_prior = bare_run("prior", {tracking.PRIOR_TAG: "gpt",
                                     tracking.TOKENIZER_RUN_TAG: empty_vqvae})
    assert "has no checkpoint" in cli_error(transformer_generation.main, ["--run_id", empty_prior], capsys)
    assert "has no generated/*.npy" in cli_error(images_from_indexes.main, ["--run_id", empty_prior], capsys)


def test_unknown_codes_name(chain, capsys):
    message = cli_error(train_prior_script.main, ["--run_id", chain["vqvae"], "--codes", "nope"], capsys)
    assert "has no codes/nope.npy (available: train)" in message


def test_prior_vocabulary_that_does_not_match_its_vqvae(chain, tmp_path, capsys):
    codes = np.random.default_rng(0).integers(0, 20, (30, 4, 4))
    np.save(tmp_path / "c.npy", codes)
    run_id = run_main(train_prior_script.main, ["--path_to_data", str(tmp_path / "c.npy"),
                                                "--codebook_size", "20", "--max_steps", "2",
                                                *TINY_PRIOR])
    assert "names no tokenizer" in cli_error(transformer_generation.main, ["--run_id", run_id],
                                             capsys)
    tracking.client().set_tag(run_id, tracking.TOKENIZER_RUN_TAG, chain["vqvae"])  # wrong lineage
    message = cli_error(transformer_generation.main, ["--run_id", run_id], capsys)
    assert "vocabulary (20) does not match its tokenizer's (16)" in message


def test_prior_grid_that_does_not_match_its_vqvae(chain, tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.random.default_rng(0).integers(0, 16, (30, 3, 3)))
    run_id = run_main(train_prior_script.main, ["--path_to_data", str(tmp_path / "c.npy"),
                                                "--codebook_size", "16", "--max_steps", "2",
                                                *TINY_PRIOR])
    tracking.client().set_tag(run_id, tracking.TOKENIZER_RUN_TAG, chain["vqvae"])
    assert "grid (3, 3) does not match its tokenizer's (4, 4)" in cli_error(
        transformer_generation.main, ["--run_id", run_id], capsys)


@pytest.mark.parametrize("array,match", [
    (np.full((2, 4, 4), 16), r"indices out of range: found 16..16, the vocabulary has 16 values"),
    (np.full((2, 4, 4), -1), r"indices out of range"),
    (np.zeros((2, 3, 3), np.int64), r"code grid \(3, 3\) does not fit the tokenizer's \(4, 4\)"),
    (np.zeros((4, 4), np.int64), r"expected code grids shaped \(N, h, w\)"),
    (np.zeros((2, 4, 4), np.float32), r"codes must be integers"),
])
def test_bad_index_files(chain, tmp_path, capsys, array, match):
    import re
    np.save(tmp_path / "bad.npy", array)
    out = tmp_path / "out"
    message = cli_error(images_from_indexes.main, ["--tokenizer_run_id", chain["vqvae"],
                                                   "--indexes_path", str(tmp_path / "bad.npy"),
                                                   "--out_dir", str(out)], capsys)
    assert re.search(match, message), message
    assert not out.exists() or not list(out.iterdir())  # nothing half-written


def test_pickled_index_file_is_refused(chain, tmp_path, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    message = cli_error(images_from_indexes.main, ["--tokenizer_run_id", chain["vqvae"],
                                                   "--indexes_path", str(tmp_path / "obj.npy")], capsys)
    assert "refused to load" in message


class Exploit:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("poisoned", [("best.pt", "last.pt"), ("last.pt",)])
def test_poisoned_checkpoint_is_refused_without_running_it(store, tmp_path, capsys, poisoned):
    marker = tmp_path / "pwned"
    run_id = bare_run("tokenizer", {tracking.TOKENIZER_TAG: "vqvae"})
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in poisoned:
        torch.save({"kind": "vqvae", "config": {}, "model": {}, "payload": Exploit(marker)},
                   folder / name)
        tracking.log_artifact(run_id, folder / name, "checkpoints")
    message = cli_error(quantize_dataset.main, ["--run_id", run_id], capsys)
    assert "refused to load" in message and f"checkpoints/{poisoned[0]}" in message
    assert not marker.exists()


def test_poisoned_last_checkpoint_is_refused_on_resume(store, image_csv, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run_id = run_main(train_vqvae.main, ["--path_to_data", str(image_csv), "--max_steps", "2",
                                         "--checkpoint_dir", str(tmp_path / "local"),
                                         *TINY_VQVAE])
    torch.save({"kind": "vqvae", "config": {}, "model": {}, "payload": Exploit(marker)},
               tmp_path / "last.pt")
    tracking.log_artifact(run_id, tmp_path / "last.pt", "checkpoints")
    message = cli_error(train_vqvae.main, ["--resume_run_id", run_id,
                                           "--checkpoint_dir", str(tmp_path / "none")], capsys)
    assert "refused to load" in message and "checkpoints/last.pt" in message
    assert not marker.exists()


def test_local_codes_file_needs_codebook_size(store, tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.zeros((3, 2, 2), np.int64))
    assert "needs --codebook_size" in cli_error(
        train_prior_script.main, ["--path_to_data", str(tmp_path / "c.npy")], capsys)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
        store, image_csv, tmp_path, capsys):
    message = cli_error(train_vqvae.main, ["--path_to_data", str(image_csv), *TINY_VQVAE,
                                           "--learning_rate", "1e30", "--max_steps", "30",
                                           "--checkpoint_every", "1",
                                           "--checkpoint_dir", str(tmp_path)], capsys)
    assert "loss became nan" in message.lower() or "loss became inf" in message.lower()
    assert "last good checkpoint" in message
    nan_step = int(message.split(" at step ")[1].split(";")[0])
    (last,) = tmp_path.glob("*/last.pt")
    checkpoint = load_checkpoint(last, "vqvae")
    assert checkpoint["step"] == nan_step  # the state just before the step that diverged
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values()
               if t.is_floating_point())
    run_id = last.parent.name
    assert tracking.client().get_run(run_id).info.status == "FAILED"
