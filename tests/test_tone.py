"""Tone matching: the curve sends a draw's pixel values to the training images' quantiles, the
VQ-VAE records those quantiles, and generation fits the curve once per setting, applies it,
logs it and re-decodes with it."""

import numpy as np
import torch

from pipeline import tracking
from pipeline.generate import LoadedPrior, generate, images_from_indexes
from pipeline.images import ImageData, read_table, split_indices
from pipeline.runs import load_run_checkpoint
from pipeline.tokenizers import load_tokenizer
from pipeline.tone import KNOTS, ToneCurve, pixel_quantiles


def strokes(n, seed):
    """(n, 1, 16, 16) in [0, 1]: a dark background of exact zeros (as decoded images clamp to)
    with bright, soft-edged blobs."""
    rng = np.random.default_rng(seed)
    images = np.clip(rng.normal(-0.4, 0.6, (n, 1, 16, 16)), 0, 1)
    return torch.from_numpy(images).float()


def hazy(images):
    """The fault tone matching removes: a grey halo on the background, strokes a little dimmer."""
    return (images * 0.9 + 0.04).clamp(0, 1)


def test_tone_curve_gives_a_hazy_draw_the_training_quantiles():
    train = strokes(400, seed=0)
    target = pixel_quantiles(train)
    assert target.shape == (1, KNOTS)
    curve = ToneCurve.fit(hazy(strokes(400, seed=1)), target)  # the calibration draw
    fresh = hazy(strokes(400, seed=2))                           # the samples it then maps
    before = (pixel_quantiles(fresh) - target).abs().max().item()
    after = (pixel_quantiles(curve(fresh)) - target).abs().max().item()
    assert before > 0.03 and after < 0.01, (before, after)
    assert (fresh < 0.01).float().mean() < 0.01 < 0.3 < (curve(fresh) < 0.01).float().mean()
    # monotone and within the training range, also across the calibration's run of zeros
    ramp = torch.linspace(-0.1, 1.1, 1001).view(1, 1, 1, -1)
    mapped = curve(ramp).flatten()
    assert (mapped.diff() >= 0).all() and mapped.min() >= 0 and mapped.max() <= 1
    again = ToneCurve.from_dict(curve.to_dict())
    assert torch.equal(again(fresh), curve(fresh))


def test_calibration_labels_follow_the_training_class_counts():
    prior = LoadedPrior.__new__(LoadedPrior)  # only the class record matters here
    prior.classes, prior.class_counts = ["a", "b", "c"], [10, 30, 60]
    assert prior.calibration_labels(200).bincount(minlength=3).tolist() == [20, 60, 120]
    prior.class_counts = None  # priors trained before the counts were recorded
    assert prior.calibration_labels(30).bincount().tolist() == [10, 10, 10]
    prior.classes = None
    assert prior.calibration_labels(30) is None


def test_vqvae_records_training_quantiles_and_generation_applies_them(chain, tmp_path):
    checkpoint = load_run_checkpoint(chain["vqvae"], "tokenizer", "vqvae")
    table = read_table(chain["csv"])
    data = ImageData(table, 1, 16)
    train_idx, _ = split_indices(len(data), 0.1, 0)  # the chain's VQ-VAE: defaults, seed 0
    images = torch.cat(list(data.ordered(train_idx, 64))).float() / 255
    assert torch.allclose(checkpoint["pixel_quantiles"], pixel_quantiles(images))

    before = set(tracking.list_artifacts(chain["prior"], "tone"))
    toned_run = generate(chain["prior"], 6, seed=5, name="toned", tone_samples=256)
    codes, toned, tone = toned_run.codes, toned_run.images, toned_run.tone
    plain_run = generate(chain["prior"], 6, seed=5, name="plain", tone_samples=0)
    plain_codes, plain, no_tone = plain_run.codes, plain_run.images, plain_run.tone
    assert tone is not None and no_tone is None
    assert torch.equal(codes, plain_codes)  # the calibration draw has its own stream
    # fitted once per setting and kept on the prior run; another seed reads the same curve
    kept = set(tracking.list_artifacts(chain["prior"], "tone"))
    assert len(kept - before) == 1
    again_tone = generate(chain["prior"], 3, seed=6, tone_samples=256).tone
    assert set(tracking.list_artifacts(chain["prior"], "tone")) == kept
    assert torch.equal(again_tone.source, tone.source)
    tokenizer = load_tokenizer(chain["vqvae"], "cpu")
    assert torch.equal(plain, tokenizer.decode(codes))
    assert torch.equal(toned, tone(plain)) and not torch.equal(toned, plain)
    # decoding the logged codes again gives the generated images, curve included
    again = images_from_indexes(chain["prior"], "toned", out_dir=tmp_path / "again")
    assert torch.equal(again, toned)
    assert torch.equal(images_from_indexes(chain["prior"], "plain"), plain)
