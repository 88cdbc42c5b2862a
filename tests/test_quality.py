"""Quality figures: precision/recall invariants, the digit classifier, the tokenizer ceiling, and
the proof that every figure ranks real < lightly blurred < heavily blurred < row-shuffled < noise
against held-out real digits (scikit-learn's bundled copy, written to tmp_path: no network)."""

import numpy as np
import pytest
import torch

from pipeline.demo_data import write_digits
from pipeline.images import ImageData, read_table
from pipeline.quality import (DEGRADATIONS, REAL_DRAWS, ImageClassifier, QualityReference,
                              degrade, frechet_distance, frechet_parts, label_agreement,
                              mean_reports, precision_recall, ranking_ladder, tokenizer_ceiling)

# figure -> +1 when higher is better, -1 when lower is better
RANKED = {"fd_ratio": -1, "precision": +1, "recall": +1, "classifier_confidence": +1}


def load(csv):
    data = ImageData(read_table(csv), 1, 16)
    return torch.cat(list(data.ordered(range(len(data)), 512))).float() / 255, data.table.labels


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    train_csv, heldout_csv = write_digits(tmp_path_factory.mktemp("digits"))
    (train, train_labels), (heldout, heldout_labels) = load(train_csv), load(heldout_csv)
    return {"train": train, "train_labels": train_labels, "heldout": heldout,
            "heldout_labels": heldout_labels,
            "reference": QualityReference(heldout, train, train_labels, heldout_labels)}


def some_training_images(digits, n=300):
    pick = np.random.default_rng(1).choice(len(digits["train"]), n, replace=False)
    return digits["train"][torch.from_numpy(pick)], [digits["train_labels"][i] for i in pick]


def assert_ranks(rows, figure, direction):
    values = [direction * rows[kind][figure] for kind in DEGRADATIONS]
    assert all(a > b for a, b in zip(values, values[1:])), (figure, dict(zip(DEGRADATIONS, values)))


def test_every_figure_ranks_the_degradation_ladder(digits):
    reference = digits["reference"]
    assert reference.feature_space == "classifier+random"
    rows = ranking_ladder(reference, some_training_images(digits)[0])
    for figure, direction in RANKED.items():
        assert_ranks(rows, figure, direction)
    # a count that saturates: all ten classes until the images stop being digits
    counts = [rows[kind]["classes_present"] for kind in DEGRADATIONS]
    assert counts == sorted(counts, reverse=True) and counts[0] == 10 > counts[-1]
    # real training images score what the reference says real images score
    assert rows["real"]["classifier_confidence"] == pytest.approx(
        rows["real"]["real_classifier_confidence"], abs=0.03)
    assert rows["real"]["fd_ratio"] == pytest.approx(1, abs=0.3)
    assert rows["real"]["precision"] == pytest.approx(rows["real"]["real_precision"], abs=0.05)
    assert rows["real"]["recall"] == pytest.approx(rows["real"]["real_recall"], abs=0.05)


def test_real_reference_is_the_mean_over_random_choices_of_training_images(digits):
    reference, n = digits["reference"], len(digits["heldout"])
    subsets = reference.real_subsets(n)
    assert len(subsets) == REAL_DRAWS and len({tuple(s) for s in subsets}) == REAL_DRAWS
    assert torch.equal(reference.real_images(n), digits["train"][torch.from_numpy(subsets[0])])
    features = [reference.embed(digits["train"][torch.from_numpy(s)]) for s in subsets]
    fds = [frechet_distance(f, reference.heldout_features) for f in features]
    # one choice's fd_real moves by about a tenth: the reason for averaging
    assert np.std(fds) > 0.03 * np.mean(fds)
    real = reference.real_figures(n)
    assert real["fd_real"] == pytest.approx(np.mean(fds), rel=1e-6)
    assert real["fd_real_sd"] == pytest.approx(np.std(fds, ddof=1), rel=1e-6)
    recalls = [precision_recall(f, reference.heldout_features)[1] for f in features]
    assert real["real_recall"] == pytest.approx(np.mean(recalls))
    # every training image: one choice, no spread
    everything = reference.real_figures(len(digits["train"]))
    assert everything["fd_real_sd"] == 0 and len(reference.real_subsets(len(digits["train"]))) == 1


def test_fd_splits_into_where_means_differ_and_where_spreads_differ(digits):
    reference = digits["reference"]
    held = reference.heldout_features
    blocks = reference.embed_blocks(digits["heldout"])
    assert list(blocks) == ["classifier", "random"]
    assert np.array_equal(np.concatenate(list(blocks.values()), 1), held)
    # a shifted copy differs in its means only, a widened one in its spread only
    shift = np.full(held.shape[1], 0.05)
    means, spreads = frechet_parts(held + shift, reference.heldout_stats)
    assert means == pytest.approx((shift ** 2).sum()) and abs(spreads) < 1e-6
    centre = held.mean(0)
    means, spreads = frechet_parts(centre + 1.5 * (held - centre), reference.heldout_stats)
    assert means < 1e-12 and spreads > 0.1 * np.trace(np.cov(held, rowvar=False))
    features = reference.embed(some_training_images(digits)[0])
    assert sum(frechet_parts(features, reference.heldout_stats)) == pytest.approx(
        frechet_distance(features, reference.heldout_stats))


def test_random_features_without_labels_see_blur_but_not_layout(digits):
    """The label-free space ranks the blurs and the noise, and recall the whole ladder; its FD
    and precision judge a 0.8-pixel blur worse than shuffled rows (it sees local texture, not
    where the strokes go), which is why labels bring in the classifier."""
    reference = QualityReference(digits["heldout"], digits["train"])
    assert reference.feature_space == "random" and reference.classifier is None
    rows = ranking_ladder(reference, some_training_images(digits)[0])
    assert_ranks(rows, "recall", +1)
    for figure, direction in (("fd_ratio", -1), ("precision", +1)):
        value = {kind: direction * rows[kind][figure] for kind in DEGRADATIONS}
        assert value["real"] > value["light_blur"] > value["heavy_blur"] > value["noise"]
        assert value["row_shuffle"] > value["noise"]


def test_classifier_is_accurate_deterministic_and_judges_requested_labels(digits):
    classifier = digits["reference"].classifier
    assert classifier.accuracy(digits["heldout"], digits["heldout_labels"]) > 0.95
    again = ImageClassifier.fit(digits["train"][:300], digits["train_labels"][:300])
    same = ImageClassifier.fit(digits["train"][:300], digits["train_labels"][:300])
    torch.testing.assert_close(again.probabilities(digits["heldout"]),
                               same.probabilities(digits["heldout"]), rtol=0, atol=0,
                               check_dtype=False)
    # mixup keeps it from being sure about a blend of all digits (0.98 "8" without it)
    assert classifier.predict(digits["train"].mean(0, keepdim=True))[1][0] < 0.5
    labels, confidence = classifier.predict(digits["heldout"][:5])
    assert labels.shape == confidence.shape == (5,) and ((0 < confidence) & (confidence <= 1)).all()

    # "samples drawn for class c": the true labels agree, labels shifted by one do not
    true = label_agreement(classifier, digits["heldout"], digits["heldout_labels"])
    shifted = label_agreement(classifier, digits["heldout"],
                              [(int(v) + 1) % 10 for v in digits["heldout_labels"]])
    assert true["agreement"] > 0.95 and shifted["agreement"] < 0.05
    assert set(true["per_label"]) == {str(c) for c in range(10)}
    assert sum(true["counts"].values()) == len(digits["heldout"])


def test_precision_and_recall_on_known_sets():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 100  # four far-apart clusters
    real = np.concatenate([c + rng.normal(size=(50, 8)) for c in centres])
    half = np.concatenate([c + rng.normal(size=(100, 8)) for c in centres[:2]])
    elsewhere = rng.normal(size=(200, 8)) * 100 + 1000
    assert precision_recall(real + 0.0, real) == (1.0, 1.0)
    precision, recall = precision_recall(half, real)
    assert precision > 0.75 and 0.35 < recall <= 0.5  # realistic, at most half covered
    assert precision_recall(elsewhere, real) == (0.0, 0.0)


def test_tokenizer_ceiling_takes_any_reconstruction(digits):
    reference = digits["reference"]
    perfect = tokenizer_ceiling(lambda x: x, reference)
    blurry = tokenizer_ceiling(lambda x: degrade(x, "heavy_blur"), reference)
    # a lossless tokenizer reaches exactly the real reference
    assert perfect["fd_ratio"] == pytest.approx(1)
    assert perfect["precision"] == perfect["real_precision"]
    assert perfect["recall"] == perfect["real_recall"]
    assert perfect["psnr"] > 100 and blurry["psnr"] < 30
    assert blurry["fd_ratio"] > 2 and blurry["recall"] < blurry["real_recall"] - 0.2
    assert perfect["num_samples"] == len(digits["heldout"])


def test_mean_reports_averages_draws_and_gives_their_spread():
    reports = [{"fd_ratio": 1.2, "recall": 0.8, "num_samples": 300, "feature_space": "random",
                "class_counts": {"0": 3}},
               {"fd_ratio": 1.4, "recall": 0.9, "num_samples": 300, "feature_space": "random",
                "class_counts": {"0": 5}}]
    merged = mean_reports(reports)
    assert merged["fd_ratio"] == pytest.approx(1.3) and merged["recall"] == pytest.approx(0.85)
    assert merged["fd_ratio_sd"] == pytest.approx(np.std([1.2, 1.4], ddof=1))
    assert merged["num_samples"] == 300 and "num_samples_sd" not in merged
    assert merged["class_counts"] == {"0": 3} and merged["draws"] == 2
    assert "fd_ratio_sd" not in mean_reports(reports[:1])
