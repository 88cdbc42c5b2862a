"""`python -m pipeline --minutes N`: the stages' shares of one deadline, and schedules that end
decayed whichever budget runs out first."""

import json

import pytest

from conftest import labelled_csv, run_main
from core.errors import UserError
from pipeline import budget as budget_module, tracking
from pipeline.__main__ import main as pipeline_main
from pipeline.budget import TimeBudget
from pipeline.schedule import learning_rate_at


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_shares_of_the_budget_follow_the_clock():
    clock = FakeClock()
    budget = TimeBudget(10, clock=clock)
    training = 10 * (1 - budget_module.BEFORE_PRIOR_SHARE - budget_module.AFTER_PRIOR_SHARE)
    assert budget.tokenizer_minutes() == pytest.approx(budget_module.TOKENIZER_SHARE * training)
    clock.now += 60 * 2  # the tokenizer took 2 minutes: the prior gets the rest, less the reserve
    assert budget.prior_minutes() == pytest.approx(8 - budget_module.AFTER_PRIOR_SHARE * 10)
    clock.now += 60 * 7  # 60 s left: sampling and tone calibration get half
    assert budget.generate_seconds() == pytest.approx(60 * budget_module.GENERATE_SHARE)
    clock.now += 30  # 30 s left: 3 draws of 10 s after the first fit, not 7
    assert budget.draws_that_fit(8, 10.0) == 4
    clock.now += 60  # past the deadline: the saved samples are still judged, and a late stage
    assert budget.draws_that_fit(8, 10.0) == 1  # still trains a little
    assert budget.prior_minutes() == budget_module.MIN_STAGE_MINUTES
    with pytest.raises(UserError, match="--minutes must be positive"):
        TimeBudget(0)


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    return labelled_csv(tmp_path_factory.mktemp("budget"), n=40, seed=3)


def test_minutes_reach_the_stages_and_the_same_command_reuses_them(store, two_classes, tmp_path):
    argv = ["--path_to_data", str(two_classes), "--out_dir", str(tmp_path / "out"),
            "--preset", "tiny", "--experiment", "budget", "--minutes", "5"]
    parent = run_main(pipeline_main, argv)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["minutes"] == 5
    assert tracking.client().get_run(parent).data.params["minutes"] == "5.0"
    tok = tracking.client().get_run(summary["tokenizer_run_id"]).data.params
    prior = tracking.client().get_run(summary["prior_run_id"]).data.params
    training = 5 * (1 - budget_module.BEFORE_PRIOR_SHARE - budget_module.AFTER_PRIOR_SHARE)
    assert float(tok["max_minutes"]) == pytest.approx(budget_module.TOKENIZER_SHARE * training)
    # the prior took what was left when it started: more than its share of an even split
    assert 5 * (1 - budget_module.AFTER_PRIOR_SHARE) - float(tok["max_minutes"]) < \
        float(prior["max_minutes"]) < 5

    # the tiny preset ends by its steps long before its minutes: the schedule followed the
    # steps, so the last step ran at the fully decayed rate (not at the share of time spent)
    lrs = tracking.client().get_metric_history(summary["prior_run_id"], "train/lr")
    last = max(lrs, key=lambda m: m.step)
    assert last.step == int(prior["max_steps"])
    assert last.value == pytest.approx(learning_rate_at(
        last.step - 1, float(prior["learning_rate"]), int(prior["max_steps"]),
        prior["lr_schedule"]))

    # the stages' computed --max_minutes differ on a second run; their keys do not
    run_main(pipeline_main, argv)
    again = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert again["stages"] == {"tokenizer": "reuse", "prior": "reuse"}


def test_a_time_limit_cuts_the_tone_calibration_draw(chain):
    from pipeline.generate import TONE_BATCH, generate
    # no time left after sampling, and no curve kept for these settings (a temperature no
    # other test draws at): no calibration draw, recorded as such
    cut = generate(chain["prior"], 4, tone_samples=4096, name="no-time", time_limit_s=0.0,
                   progress=False, temperature=0.77)
    assert cut.generation.tone_samples == 0 and cut.tone is None
    # a curve kept for the settings is used whatever the time: nothing to draw
    generate(chain["prior"], 4, tone_samples=TONE_BATCH, name="fit", progress=False,
             temperature=0.78)
    kept = generate(chain["prior"], 4, tone_samples=TONE_BATCH, name="kept", time_limit_s=0.0,
                    progress=False, temperature=0.78)
    assert kept.generation.tone_samples == TONE_BATCH and kept.tone is not None
    # time for far more than asked: the draw is the one asked for
    ample = generate(chain["prior"], 4, tone_samples=TONE_BATCH, name="time", time_limit_s=1e6,
                     progress=False, temperature=0.79)
    assert ample.generation.tone_samples == TONE_BATCH and ample.tone is not None
