"""Learning-rate schedules, --epochs as a budget, and the weight average's warm-up."""

import math

import pytest
import torch

import train as train_prior_script
from conftest import TINY_PRIOR, run_main
from core.errors import UserError
from pipeline import tracking
from pipeline.schedule import learning_rate_at, warmup_steps_for
from pipeline.train_loop import WeightAverage


def test_each_schedule_has_its_shape_after_the_warmup():
    steps, peak = 1000, 1.0
    warmup = warmup_steps_for(steps)
    assert learning_rate_at(0, peak, steps) == pytest.approx(peak / warmup)
    cosine = [learning_rate_at(s, peak, steps, "cosine", 0.2) for s in range(warmup, steps)]
    assert cosine[0] == pytest.approx(peak) and cosine[-1] == pytest.approx(0.2, abs=1e-4)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert {learning_rate_at(s, peak, steps, "constant") for s in range(warmup, steps)} == {peak}
    # step: x0.5 at each epoch's end (epochs of 100 steps)
    for s in (warmup, 99, 100, 250, 999):
        assert learning_rate_at(s, peak, steps, "step", 0.5, 100) == 0.5 ** (s // 100)


def test_weight_average_warms_up_to_the_trained_weights():
    """A short training judged on its average must see trained weights: with the warm-up, 60
    steps at decay 0.999 leave the average near the end point, not at the initialisation
    (a plain 0.999 average would still be ~94% initial weights)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    start = model.weight.detach().clone()
    average = WeightAverage(model, decay=0.999)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    for step in range(60):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        average.update(model, step)
    trained = model.weight.detach()
    assert (average.model.weight - trained).norm() < 0.15 * (start - trained).norm()
    assert average.decay_at(0) == pytest.approx(0.1) and average.decay_at(10 ** 6) == 0.999


def test_epochs_set_the_steps_and_the_step_schedule_decays_per_epoch(chain):
    # 48 images, 10% validation: 43 training grids, batch 16 -> 3 steps an epoch
    run_id = run_main(train_prior_script.main,
                      ["--run_id", chain["vqvae"], "--epochs", "4", "--lr_schedule", "step",
                       "--lr_decay", "0.5", "--learning_rate", "1e-3", "--eval_every", "100",
                       *TINY_PRIOR])
    config = tracking.load_json_artifact(run_id, "config.json")
    assert config["train"]["epochs"] == 4 and config["train"]["max_steps"] == 4 * 3
    lr = {m.step: m.value for m in tracking.client().get_metric_history(run_id, "train/lr")}
    # logged at step 10 (the step taken was step 9, in the fourth epoch) and at the last step
    assert lr[10] == pytest.approx(1e-3 * 0.5 ** 3)
    assert tracking.client().get_run(run_id).info.status == "FINISHED"


def test_epochs_and_max_steps_together_are_refused(chain):
    with pytest.raises(UserError, match="--epochs and --max_steps"):
        run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--epochs", "2",
                                           "--max_steps", "10", *TINY_PRIOR])
    with pytest.raises(UserError, match="--lr_schedule must be one of"):
        run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--max_steps", "2",
                                           "--lr_schedule", "linear", *TINY_PRIOR])
    assert math.isfinite(learning_rate_at(5, 1.0, 10, "step", None, 3))
