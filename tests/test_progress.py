"""Progress bars on the waits: the samplers report their steps, a draw made of batches or seeds
has one bar, the commands' bars go to stderr, and progress=False prints none.

The bars show only past progress.DELAY_S seconds; these tests set it to 0, as a long wait would.
"""

import io

import pytest
import torch
from tqdm import tqdm

import priors
import quantize_dataset
import transformer_generation
from conftest import run_main
from pipeline import progress, tracking
from pipeline.generate import LoadedPrior, draws_of, generate, sample_tokens

CODES = dict(vocab_size=8, grid_h=4, grid_w=4, channels=1, ordered=False, num_classes=0)
# every family, and the absorbing prior's second sampler, which may end before its last step
SAMPLERS = [(name, {}) for name in priors.FAMILIES] + [("absorbing", {"sampler": "maskgit"})]


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0)


@pytest.mark.parametrize("family,settings", SAMPLERS, ids=lambda p: p if isinstance(p, str)
                         else "-".join(p.values()) or "default")
def test_a_sampler_reports_its_draw_in_shares_and_watching_changes_nothing(family, settings):
    torch.manual_seed(0)
    model = priors.build(family, CODES).eval()
    shares = []
    watched = model.sample(3, generator=torch.Generator().manual_seed(1),
                           on_progress=shares.append, **settings)
    plain = model.sample(3, generator=torch.Generator().manual_seed(1), **settings)
    assert torch.equal(watched, plain)
    assert len(shares) > 1 and all(share > 0 for share in shares)
    assert sum(shares) == pytest.approx(1) or (settings and sum(shares) < 1)


def test_one_bar_follows_the_batches_of_a_draw_to_its_grids():
    torch.manual_seed(0)
    model = priors.build("gpt", CODES).eval()
    bar = tqdm(total=10, file=io.StringIO())
    moves = []
    bar.update = lambda n, update=bar.update: (moves.append(n), update(n))
    codes = sample_tokens(model, 10, 4, generator=torch.Generator().manual_seed(2), bar=bar)
    assert bar.n == pytest.approx(10)  # three batches: 4, 4, 2 grids
    assert len(moves) > 3  # it moved within the batches, not only after each
    assert torch.equal(codes, sample_tokens(model, 10, 4,
                                            generator=torch.Generator().manual_seed(2)))


def test_a_generation_shows_each_wait_on_stderr_and_progress_false_none(chain, capsys,
                                                                        no_delay):
    capsys.readouterr()
    run_main(transformer_generation.main, ["--run_id", chain["prior"], "--num_samples", "4",
                                           "--batch_size", "2", "--tone_samples", "12",
                                           "--name", "watched"])  # its stdout ends in run_id=
    err = capsys.readouterr().err
    for wait in ("sampling", "tone calibration", "tone calibration (decoding)", "decoding"):
        assert err.count(f"{wait}:   0%") == 1, err  # one bar per wait, for all its batches
    assert "grid/s" in err

    generate(chain["prior"], 4, batch_size=2, tone_samples=14, name="quiet", progress=False)
    assert "%|" not in capsys.readouterr().err


def test_the_quality_draws_have_one_bar_for_all_seeds(chain, capsys, no_delay):
    prior = LoadedPrior(chain["prior"], torch.device("cpu"))
    capsys.readouterr()
    draws = draws_of(prior.model, prior.tokenizer(), [3, 4], 4, batch_size=2)
    err = capsys.readouterr().err
    assert len(draws) == 2 and err.count("quality draws:   0%") == 1 and "sampling" not in err


def test_quantizing_shows_a_bar(store, image_csv, capsys, no_delay):
    capsys.readouterr()
    run_main(quantize_dataset.main, ["--path_to_data", str(image_csv), "--tokenizer", "pixels",
                                     "--mode", "levels", "--bits", "2"])
    assert "quantizing:   0%" in capsys.readouterr().err


def test_the_last_uploads_show_a_bar_unless_progress_is_off(store, capsys, no_delay):
    for shown in (True, False):
        run_id = tracking.create_run("prior")
        uploader = tracking.Uploader(run_id)
        uploader.log_metrics({"loss": 1.0}, 1)
        capsys.readouterr()
        assert uploader.close(60, progress=shown) == ([], [])
        assert ("uploading:" in capsys.readouterr().err) == shown
        assert [m.value for m in tracking.client().get_metric_history(run_id, "loss")] == [1.0]
        tracking.end_run(run_id)
