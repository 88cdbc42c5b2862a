"""--sample_every: a prior run's `training_samples` image at step 0, every N steps and the last,
drawn from the weights sampling uses, without changing what the run trains."""

import numpy as np
import pytest
import torch

import train as train_prior_script
from conftest import TINY_PRIOR, run_main
from pipeline import describe, train_prior, tracking
from pipeline.cli import run_cli
from pipeline.runs import load_run_checkpoint
from test_describe import step_images


def sample_steps(run_id):
    return sorted({int(m["step"]) for m in step_images(run_id)
                   if m and m["key"] == train_prior.SAMPLES_KEY})


def test_frames_at_step_0_every_n_steps_and_the_last_and_a_resume_goes_on(chain):
    flags = ["--run_id", chain["vqvae"], "--eval_every", "5", "--checkpoint_every", "5",
             *TINY_PRIOR]
    run_id = run_main(train_prior_script.main, [*flags, "--max_steps", "12",
                                                "--sample_every", "5"])
    assert sample_steps(run_id) == [0, 5, 10, 12]
    note = tracking.client().get_run(run_id).data.tags[describe.NOTE_TAG]
    assert train_prior.SAMPLES_KEY in note  # the description says what the image is
    run_main(train_prior_script.main, ["--resume_run_id", run_id, "--max_steps", "16"])
    assert sample_steps(run_id) == [0, 5, 10, 12, 15, 16]  # no second step 0


def test_frames_come_from_the_weight_average_with_a_column_per_class_and_change_nothing(
        chain, monkeypatch):
    drawn = []  # (weights, labels, generator state) of each frame's draw
    original = train_prior.sample_tokens

    def spy(model, count, batch_size, labels, generator, **kwargs):
        drawn.append((model.state_dict(), labels, generator.get_state()))
        return original(model, count, batch_size, labels, generator, **kwargs)

    monkeypatch.setattr(train_prior, "sample_tokens", spy)
    flags = ["--run_id", chain["vqvae"], "--max_steps", "6", "--eval_every", "6",
             "--checkpoint_every", "6", "--conditional", "--ema_decay", "0.9",
             *TINY_PRIOR, "--dropout", "0.2"]  # dropout: sampling must not shift its masks
    run_id = run_main(train_prior_script.main, [*flags, "--sample_every", "3"])
    checkpoint = load_run_checkpoint(run_id, "prior", "prior")
    assert len(drawn) == 3  # steps 0, 3, 6
    for name, value in checkpoint["ema"].items():
        torch.testing.assert_close(drawn[-1][0][name], value)
    assert not torch.equal(checkpoint["ema"]["token_embedding.weight"],
                           checkpoint["model"]["token_embedding.weight"])
    labels = drawn[0][1]  # 3 classes in turn: one column each, SAMPLE_ROWS rows
    assert torch.equal(labels, torch.arange(3 * train_prior.SAMPLE_ROWS) % 3)
    assert all(torch.equal(state, drawn[0][2]) for _, _, state in drawn)  # the same seed

    plain = run_main(train_prior_script.main, flags)  # the same training without the frames
    assert sample_steps(plain) == []
    alone = load_run_checkpoint(plain, "prior", "prior")
    for name, value in alone["model"].items():
        torch.testing.assert_close(checkpoint["model"][name], value, rtol=0, atol=0)


def test_a_prior_from_a_local_codes_file_cannot_draw_frames(store, tmp_path, capsys):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.random.default_rng(0).integers(0, 16, (20, 4, 4)))
    before = len(tracking.client().search_runs([tracking.experiment_id()]))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_prior_script.main, ["--path_to_data", str(codes), "--codebook_size", "16",
                                          "--max_steps", "2", "--sample_every", "1",
                                          *TINY_PRIOR])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --sample_every needs --run_id (a tokenizer run): a prior trained from a local "
        "file cannot decode its samples")
    assert len(tracking.client().search_runs([tracking.experiment_id()])) == before
