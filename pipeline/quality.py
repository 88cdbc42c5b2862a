"""Offline sample-quality figures: nothing is downloaded, everything is computed from the data.

Every figure compares a set of images (samples, or a tokenizer's reconstructions) with held-out
real images, and is reported next to the same figure for an equal number of real *training*
images, the value a perfect generator would reach.

- The feature space (`feature_space`). With labels, "classifier+random": the 128-d penultimate
  layer of a small CNN classifier fit on the training images (`ImageClassifier`, seconds on a
  CPU, seeded; MNIST-scale papers use a LeNet in place of Inception) joined with the features of
  a fixed, seeded random conv net, each part scaled to unit total variance on the held-out set.
  Each part alone failed the ranking check on the demo digits: the classifier's features are
  blind to a light blur (its precision rose from 0.93 to 0.94), the random ones judge a 0.8-px
  blur worse than rows shuffled at random (FD ratio 13.8 vs 9.8); together they rank every step
  (benchmarks/bench_quality.py). Without labels, "random" alone (random conv features still
  separate image distributions, cf. Naeem et al. 2020); "classifier" alone on request.
- `fd`: Fréchet distance between Gaussians fit to the features of the images and of the held-out
  set; `fd_real` the same for as many real training images, the mean over REAL_DRAWS random
  choices of them (`fd_real_sd`: their spread); `fd_ratio` = fd / fd_real (~1 is perfect, lower
  is better).
- `precision` / `recall` (Kynkäänniemi et al. 2019, k = 3): each point of a set gets a ball
  reaching its k-th nearest neighbour in that set, and the union of the balls is the set's
  manifold. precision = share of the images inside the held-out manifold (are they realistic?),
  recall = share of held-out images inside the images' manifold (is the data's variety covered?).
  `real_precision` / `real_recall` are the reference figures of real training images (means
  over the same choices).
- With labels: `classifier_confidence` (mean top softmax probability; the real reference's is
  `real_classifier_confidence`: trained with mixup, it gives real digits 0.89-0.91),
  `classes_present`, `class_counts`, and the classifier's accuracy on the held-out images
  when their labels are known (`classifier_heldout_accuracy`: how far to trust the space).
- Memorisation (pixel space): `nn_ratio`, the median distance from an image to its nearest
  training image over the same for held-out images (~1: as novel as new real data; << 1:
  copies); `copy_fraction`, the share closer to a training image than 95% of held-out images.
  These say whether images are copies, not whether they are good: noise has a large nn_ratio.

`tokenizer_ceiling` computes the same figures for a tokenizer's reconstructions of real training
images (what a perfect prior over its codes would produce), the best such a prior can reach.
`degrade` makes the images of the ranking check (tests/test_quality.py,
benchmarks/bench_quality.py): a figure is trusted only if it ranks real > lightly blurred >
heavily blurred > row-shuffled > noise.

Memory does not grow faster than the images themselves: real images may be given as uint8 (as
decoded; 4x smaller than floats) and are turned into floats a batch at a time, features are
computed in batches, and pairwise distances in blocks of rows (DISTANCE_BLOCK_BYTES), never as
one N x N matrix. Sets small enough for one batch or block give the very numbers computed in
one piece; above that, BLAS may round a distance differently in its last bit.
"""

import contextlib
import hashlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError
from pipeline.tokenizers import load_tokenizer

K_NEIGHBOURS = 3
# The real reference's figures are means over this many random choices of training images: one
# choice of 300 demo digits gave an fd_real 11% (one sd) above or below the mean of 40, and every
# FD ratio moved with it; 32 choices bring that to 2%, for about a second.
REAL_DRAWS = 32
FEATURE_SPACES = ("classifier+random", "classifier", "random")
DISTANCE_BLOCK_BYTES = 64 << 20  # the most pairwise distances held at once (float64, or pixels)
FEATURE_BATCH = 256  # images per batch of random features (its first layer: 256 KB per image)
CLASSIFIER_BATCH = 512  # images per batch through the classifier
CEILING_CHUNK = 2048  # training images reconstructed at a time by tokenizer_ceiling


# helpers

def as_unit(images):
    """uint8 images (as decoded) -> floats in [0, 1]; float images unchanged (as float32)."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _stored(images):
    """How a reference keeps images: uint8 as they are, anything else as float32."""
    return images if images.dtype == torch.uint8 else images.float()


def _spans(n, size, least=16):
    """Slices of range(n), `size` long; a last one shorter than `least` joins the one before
    (a convolution over a batch of one image rounds differently from one over many)."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] < least:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, starts[1:] + [n])]


def _row_blocks(rows, columns, item_bytes=8):
    """Slices of range(rows) such that rows x columns items of item_bytes fit
    DISTANCE_BLOCK_BYTES (at least 64 rows): one slice for a set that fits."""
    step = max(64, DISTANCE_BLOCK_BYTES // (item_bytes * max(columns, 1)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


# feature spaces


def random_features(images, seed=0, width=64):
    """(N, C, S, S) in [0, 1] -> (N, 2*width) features of a fixed random conv net."""
    generator = torch.Generator().manual_seed(seed)
    channels = images.shape[1]
    x = F.interpolate(images.float(), size=32, mode="bilinear", align_corners=False) * 2 - 1
    w1 = torch.randn(width, channels, 3, 3, generator=generator) / (channels * 9) ** 0.5
    w2 = torch.randn(width, width, 3, 3, generator=generator) / (width * 9) ** 0.5
    h1 = F.relu(F.conv2d(x, w1, padding=1))
    h2 = F.relu(F.conv2d(F.avg_pool2d(h1, 2), w2, padding=1))
    # global mean plus a coarse spatial layout: where the strokes are matters for images
    return torch.cat([h2.mean((2, 3)), F.adaptive_avg_pool2d(h2.mean(1, keepdim=True), 8)
                      .flatten(1)[:, :width]], 1).numpy().astype(np.float64)


@contextlib.contextmanager
def _one_thread():
    """The classifier's convolutions are too small to gain from threads, and on a busy machine
    two threads waiting on each other made fitting 10x slower (8.5 s vs 92 s measured); one
    thread also makes its results independent of the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _SmallCNN(nn.Module):
    """LeNet-sized: two conv/pool stages, a 128-d penultimate layer (the feature space)."""

    def __init__(self, in_channels, num_classes, width=16, feature_dim=128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):  # (B, C, S, S) in [-1, 1] -> features (B, 128), logits (B, classes)
        features = self.body(x)
        return features, self.head(features)


class ImageClassifier:
    """A small CNN fit on labelled images: a feature space that sees the classes, and a judge of
    which class an image shows.

        classifier = ImageClassifier.fit(train_images, train_labels)
        labels, confidence = classifier.predict(samples)     # (N,) str, (N,) top probability
        label_agreement(classifier, samples, requested_labels)

    Labels are compared as strings (a CSV's 3 and "3" are one class). Fitting is seeded and
    leaves the global RNG alone, so the same images give the same classifier.
    """

    def __init__(self, net, classes, size):
        self.net, self.classes, self.size = net.eval(), np.asarray(classes), size

    @classmethod
    def fit(cls, images, labels, seed=0, epochs=15, batch_size=64, learning_rate=2e-3,
            mixup=0.4):
        """images (N, C, S, S) in [0, 1] or uint8; labels (N,) of anything; rows labelled
        None/NaN are left out. Images are resized to min(S, 32) (32 is plenty to tell classes
        apart).

        Trained with mixup (Zhang et al. 2018; blends of two images, lambda ~ Beta(mixup,
        mixup), with the blended target): without it the mean of the training digits, a blob,
        was called an "8" with confidence 0.98; with it 0.34, while held-out accuracy rose from
        0.983 to 0.990 and real digits' mean confidence went from 0.97 to 0.91."""
        labels = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                  for v in labels]
        keep = [i for i, v in enumerate(labels) if v is not None]
        classes = sorted({labels[i] for i in keep})
        targets = F.one_hot(torch.tensor([classes.index(labels[i]) for i in keep]),
                            len(classes)).float()
        size = min(images.shape[-1], 32)
        with torch.random.fork_rng(devices=[]), _one_thread():
            torch.manual_seed(seed)
            net = _SmallCNN(images.shape[1], len(classes))
            classifier = cls(net, classes, size)
            x = images[keep]  # as given (uint8 stays uint8); each batch is prepared on its own
            optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-2)
            steps = epochs * math.ceil(len(x) / batch_size)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, steps)
            blend = torch.distributions.Beta(mixup, mixup)
            net.train()
            for _ in range(epochs):
                order = torch.randperm(len(x))
                for i in range(0, len(x), batch_size):
                    pick = order[i:i + batch_size]
                    # one-pixel random shifts: the classifier should not hinge on exact placement
                    shift = torch.randint(-1, 2, (2,)).tolist()
                    batch = torch.roll(classifier._prepare(x[pick]), shift, dims=(2, 3))
                    target = targets[pick]
                    share, partner = blend.sample(), torch.randperm(len(pick))
                    batch = share * batch + (1 - share) * batch[partner]
                    target = share * target + (1 - share) * target[partner]
                    loss = F.cross_entropy(net(batch)[1], target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            net.eval()
        return classifier

    def _prepare(self, images):
        x = as_unit(images)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=True)
        return x * 2 - 1

    @torch.no_grad()
    def _run(self, images, batch_size=None):
        batch_size = batch_size or CLASSIFIER_BATCH
        with _one_thread():
            parts = [self.net(self._prepare(images[i:i + batch_size]))
                     for i in range(0, len(images), batch_size)]
        return torch.cat([f for f, _ in parts]), torch.cat([l for _, l in parts])

    def features(self, images):
        """(N, C, S, S) in [0, 1] -> (N, 128) float64 penultimate-layer features."""
        return self._run(images)[0].numpy().astype(np.float64)

    def probabilities(self, images):
        """(N, C, S, S) in [0, 1] -> (N, num_classes) softmax, columns in `self.classes` order."""
        return self._run(images)[1].softmax(1).numpy()

    def predict(self, images):
        """(N, C, S, S) in [0, 1] -> (predicted labels (N,) str, confidence (N,) in [0, 1])."""
        probs = self.probabilities(images)
        return self.classes[probs.argmax(1)], probs.max(1)

    def accuracy(self, images, labels):
        predicted, _ = self.predict(images)
        return float((predicted == np.asarray([str(v) for v in labels])).mean())


def label_agreement(classifier, samples, requested_labels):
    """How often samples drawn for a class are classified as that class.

    -> {"agreement": share over all samples, "per_label": {label: share}, "counts": {label: n}}"""
    requested = np.asarray([str(v) for v in requested_labels])
    predicted, _ = classifier.predict(samples)
    hits = predicted == requested
    per_label = {label: float(hits[requested == label].mean()) for label in np.unique(requested)}
    counts = {label: int((requested == label).sum()) for label in np.unique(requested)}
    return {"agreement": float(hits.mean()), "per_label": per_label, "counts": counts}

# distances


def _sqrtm_psd(matrix):
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def gaussian_stats(features):
    """(N, d) -> (mean, covariance, its square root): what frechet_distance needs of a set it
    meets many times (the held-out set), computed once."""
    cov = np.cov(features, rowvar=False)
    return features.mean(0), cov, _sqrtm_psd(cov)


def frechet_parts(a, b):
    """The two terms of the FD between feature sets a (N, d) and b (M, d) (or b's
    gaussian_stats): (|mu_a - mu_b|^2, tr(A + B - 2 (A B)^1/2)), where the means differ and where
    the spreads do."""
    mu_a, cov_a = a.mean(0), np.cov(a, rowvar=False)
    mu_b, cov_b, root_b = gaussian_stats(b) if isinstance(b, np.ndarray) else b
    cross = _sqrtm_psd(root_b @ cov_a @ root_b)  # tr sqrt(A B) = tr sqrt(B^1/2 A B^1/2)
    return (float(((mu_a - mu_b) ** 2).sum()),
            float(np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross)))


def frechet_distance(a, b):
    """FD between Gaussians fit to feature sets a (N, d) and b (M, d), or b's gaussian_stats."""
    return sum(frechet_parts(a, b))


def _pairwise(a, b):
    return torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def knn_radii(features, k=K_NEIGHBOURS):
    """(N, d) -> (N,) distance from each point to its k-th nearest other point of the set, in
    blocks of rows (memory O(block x N), not O(N^2))."""
    # column 0 of a sorted row is the point itself; partition finds the same k-th value
    return np.concatenate([np.partition(_pairwise(features[rows], features), k, axis=1)[:, k]
                           for rows in _row_blocks(len(features), len(features))])


def manifold_share(queries, references, radii):
    """Share of `queries` (N, d) inside the union of balls around `references` (M, d), in
    blocks of query rows."""
    inside = [(_pairwise(queries[rows], references) <= radii[None, :]).any(1)
              for rows in _row_blocks(len(queries), len(references))]
    return float(np.concatenate(inside).mean())


def precision_recall(features, real_features, k=K_NEIGHBOURS, real_radii=None):
    """Improved precision and recall (Kynkäänniemi et al. 2019) of a feature set against real
    features: (share of `features` on the real manifold, share of real ones on theirs).
    real_radii: knn_radii(real_features, k), when already known."""
    if real_radii is None:
        real_radii = knn_radii(real_features, k)
    return (manifold_share(features, real_features, real_radii),
            manifold_share(real_features, features, knn_radii(features, k)))


def nearest_distances(queries, references, batch=512):
    """Pixel-space L2 distance from each query to its nearest reference image (images uint8
    or floats in [0, 1]): queries `batch` at a time against blocks of references, each taken
    as floats only while it is compared."""
    q, r = queries.flatten(1), references.flatten(1)
    nearest = None
    for block in _row_blocks(len(r), r.shape[1], item_bytes=4):
        refs = as_unit(r[block])
        found = torch.cat([torch.cdist(as_unit(q[i:i + batch]), refs).min(1).values
                           for i in range(0, len(q), batch)])
        nearest = found if nearest is None else torch.minimum(nearest, found)
    return nearest.numpy()

# main class


def _check_enough(images, what):
    # the k-nearest-neighbour radii need k other points in each set
    if len(images) <= K_NEIGHBOURS:
        raise UserError(f"quality figures need more than {K_NEIGHBOURS} {what}, got {len(images)}")


class QualityReference:
    """What every quality report compares against, computed once: the held-out set's features,
    the real-training-image reference figures, the classifier. `report(images)` then costs only
    the images' own features.

    feature_space: "auto" ("classifier+random" with train_labels, else "random") or one of
    FEATURE_SPACES (see the module doc). heldout_labels only add the classifier's accuracy.
    heldout, train: (N, C, S, S), uint8 as decoded (kept so, 4x smaller) or floats in [0, 1]."""

    def __init__(self, heldout, train, train_labels=None, heldout_labels=None, seed=0,
                 feature_space="auto"):
        for name, images in (("held-out", heldout), ("training", train)):
            _check_enough(images, f"{name} images")
        self.heldout, self.train, self.seed = _stored(heldout), _stored(train), seed
        if feature_space == "auto":
            feature_space = "random" if train_labels is None else "classifier+random"
        if feature_space not in FEATURE_SPACES:
            raise ValueError(f"feature_space must be auto or one of {', '.join(FEATURE_SPACES)}")
        if feature_space != "random" and train_labels is None:
            raise ValueError(f"feature_space '{feature_space}' needs train_labels")
        self.feature_space = feature_space
        self.classifier = None
        if train_labels is not None:
            self.classifier = ImageClassifier.fit(self.train, train_labels, seed=seed)
        blocks = []
        if feature_space in ("classifier", "classifier+random"):
            blocks.append(("classifier", self.classifier.features))
        if feature_space in ("random", "classifier+random"):
            blocks.append(("random", self._random_features))
        # Each block is divided by its total standard deviation over the held-out images, so in
        # the joint space neither the classifier's nor the random net's features dominate.
        self._blocks = [(name, embed, np.sqrt(embed(self.heldout).var(0).sum()) or 1.0)
                        for name, embed in blocks]
        self.heldout_labels = heldout_labels
        self.heldout_features = self.embed(self.heldout)
        self.heldout_stats = gaussian_stats(self.heldout_features)
        self.heldout_radii = knn_radii(self.heldout_features)
        self.heldout_nn = nearest_distances(self.heldout, self.train)
        self.fingerprint = self._fingerprint(train_labels)
        self._real = {}  # n -> figures of n real training images (the reference)
        self._train_embedding = None

    def _fingerprint(self, train_labels):
        """A digest of what the figures depend on besides the samples: the held-out and the
        training images, the labels, the feature space and the seed. Two figures compare only
        when it is the same (pipeline/ranking.py)."""
        digest = hashlib.sha256()
        for array in (self.heldout, self.train):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(repr((list(map(str, train_labels)) if train_labels is not None else None,
                            self.feature_space, self.seed)).encode())
        return digest.hexdigest()[:16]

    def _random_features(self, images):
        return np.concatenate([random_features(as_unit(images[span]), seed=self.seed)
                               for span in _spans(len(images), FEATURE_BATCH)])

    def embed(self, images):
        """(N, C, S, S) in [0, 1] or uint8 -> (N, d) features in this reference's feature
        space, computed in batches."""
        return np.concatenate([embed(images) / scale for _, embed, scale in self._blocks], 1)

    def embed_blocks(self, images):
        """{block name: (N, d_block) features}: the parts `embed` joins, scaled as there."""
        return {name: embed(images) / scale for name, embed, scale in self._blocks}

    def real_subsets(self, n):
        """REAL_DRAWS seeded random choices of n training-image indices (the first is
        `real_images(n)`); one choice when n covers the whole training set."""
        rng = np.random.default_rng(self.seed)
        draws = 1 if n >= len(self.train) else REAL_DRAWS
        return [rng.choice(len(self.train), n, replace=False) for _ in range(draws)]

    def real_images(self, n):
        """The n training images (a seeded random choice) that serve as the real reference,
        as floats in [0, 1]."""
        return as_unit(self.train[torch.from_numpy(self.real_subsets(n)[0])])

    def subset_figures(self, images, n):
        """fd, precision, recall (and confidence) of `images` (N_train, C, S, S), one per
        training image (the images themselves, or a tokenizer's reconstructions of them): the
        means over real_subsets(n), with `fd_sd`, the subsets' standard deviation of fd."""
        return self._subset_means(*self._embedding(images), n)

    def _embedding(self, images):
        """-> (features (N, d), the classifier's confidence (N,) or None)."""
        confidence = self.classifier.predict(images)[1] if self.classifier is not None else None
        return self.embed(images), confidence

    def _subset_means(self, features, confidence, n):
        figures = []
        for subset in self.real_subsets(n):
            precision, recall = precision_recall(features[subset], self.heldout_features,
                                                 real_radii=self.heldout_radii)
            figures.append({"fd": frechet_distance(features[subset], self.heldout_stats),
                            "precision": precision, "recall": recall})
            if confidence is not None:
                figures[-1]["classifier_confidence"] = float(confidence[subset].mean())
        means = {key: float(np.mean([f[key] for f in figures])) for key in figures[0]}
        means["fd_sd"] = (float(np.std([f["fd"] for f in figures], ddof=1))
                          if len(figures) > 1 else 0.0)
        return means

    def real_figures(self, n):
        """fd, precision, recall and confidence of n real training images against the held-out
        set: the means over REAL_DRAWS random choices of n images (see REAL_DRAWS), with
        `fd_real_sd`, the choices' standard deviation of fd."""
        if n not in self._real:
            if self._train_embedding is None:  # shared by every n (samples, ceiling)
                self._train_embedding = self._embedding(self.train)
            means = self._subset_means(*self._train_embedding, n)
            self._real[n] = {("fd_real_sd" if key == "fd_sd" else
                              "fd_real" if key == "fd" else f"real_{key}"): value
                             for key, value in means.items()}
        return self._real[n]

    def report(self, images):
        """images (N, C, S, S) in [0, 1] -> a flat dict of figures (see the module doc)."""
        _check_enough(images, "samples")
        images = as_unit(images)
        features = self.embed(images)
        real = self.real_figures(min(len(images), len(self.train)))
        fd = frechet_distance(features, self.heldout_stats)
        precision, recall = precision_recall(features, self.heldout_features,
                                             real_radii=self.heldout_radii)
        nn_images = nearest_distances(images, self.train)
        report = {"feature_space": self.feature_space,
                  "fd": fd, "fd_real": real["fd_real"], "fd_real_sd": real["fd_real_sd"],
                  "fd_ratio": fd / max(real["fd_real"], 1e-12),
                  "precision": precision, "recall": recall,
                  "real_precision": real["real_precision"], "real_recall": real["real_recall"],
                  "nn_ratio": float(np.median(nn_images) / max(np.median(self.heldout_nn), 1e-12)),
                  "copy_fraction": float((nn_images < np.percentile(self.heldout_nn, 5)).mean()),
                  "num_samples": len(images), "num_heldout": len(self.heldout)}
        if self.classifier is not None:
            report.update(self._class_figures(images))
            report["real_classifier_confidence"] = real["real_classifier_confidence"]
        return report

    def _class_figures(self, images):
        predicted, confidence = self.classifier.predict(images)
        counts = {str(c): int((predicted == c).sum()) for c in self.classifier.classes}
        figures = {"classes_present": int(sum(v > 0 for v in counts.values())),
                   "num_classes": len(self.classifier.classes),
                   "classifier_confidence": float(confidence.mean()),
                   "class_counts": counts}
        if self.heldout_labels is not None:
            figures["classifier_heldout_accuracy"] = self.classifier.accuracy(
                self.heldout, self.heldout_labels)
        return figures


SPREAD = ("fd_ratio", "precision", "recall", "classifier_confidence", "label_agreement")


def mean_reports(reports):
    """Several draws' reports -> one: the mean of every number, `<name>_sd` (the draws'
    standard deviation) for the figures in SPREAD, the rest (feature space, class counts)
    from the first draw. With 300 samples of the demo, one draw's FD ratio moves by about
    0.09 with the seed, more than the differences worth tuning for; the mean of 8 draws by
    about 0.03."""
    merged = dict(reports[0])
    for key, value in reports[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in reports]
            merged[key] = float(np.mean(values))
            if key in SPREAD and len(reports) > 1:
                merged[f"{key}_sd"] = float(np.std(values, ddof=1))
    merged["draws"] = len(reports)
    return merged


def with_spread(figures, key, digits):
    """'0.907 ± 0.008' from figures[key] and figures[key + '_sd'] (a mean over draws and their
    standard deviation), or '0.907' without the sd."""
    sd = figures.get(f"{key}_sd")
    return f"{figures[key]:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def report_draws(reference, draws, requested=None):
    """reference.report() of each draw of samples (with `label_agreement` when `requested`
    labels are given and the reference has a classifier), merged by mean_reports."""
    reports = []
    for images in draws:
        report = reference.report(images)
        if requested is not None and reference.classifier is not None:
            report["label_agreement"] = label_agreement(reference.classifier, images,
                                                        requested)["agreement"]
        reports.append(report)
    return mean_reports(reports)


@torch.no_grad()
def reconstruct_all(reconstruct, images, batch_size=256):
    """reconstruct ((B, C, S, S) -> same) applied to images (N, C, S, S) in batches; -> floats
    in [0, 1] on the CPU."""
    return torch.cat([reconstruct(images[i:i + batch_size]).float().cpu().clamp(0, 1)
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def tokenizer_ceiling(reconstruct, reference, batch_size=256):
    """The best figures a prior over a tokenizer's codes can reach.

    A prior that learned the training codes perfectly would sample reconstructions of training
    images, so the figures are those of the tokenizer's reconstructions of real training images
    (as many as there are held-out images), judged against the held-out set like samples, on
    the same random choices of training images as the real reference's figures and averaged the
    same way: `fd_ratio` then isolates what the tokenizer loses (1 = nothing). nn ratio and the
    class figures are those of the first choice. `psnr` (dB, pixels in [0, 1]) is measured on
    the held-out images, which the tokenizer never saw. (Reconstructions of the held-out images
    themselves would each sit next to their own original: precision and recall were both 1.000
    for every VQ-VAE tried, telling nothing.)

    reconstruct: (B, C, S, S) in [0, 1] -> (B, C, S, S) in [0, 1], e.g. decode(encode(x)).
    reference: a QualityReference.

    The images are reconstructed a chunk at a time and only their features (and the first
    choice's images) are kept. A chunk is a multiple of batch_size and of the classifier's
    batch, so every batch holds the images it held when the whole set went at once."""
    n = min(len(reference.heldout), len(reference.train))
    first = torch.from_numpy(reference.real_subsets(n)[0])
    step = math.lcm(batch_size, CLASSIFIER_BATCH)
    chunk = step * max(1, CEILING_CHUNK // step)
    features, confidence, chosen = [], [], None
    for span in _spans(len(reference.train), chunk):
        recon = reconstruct_all(reconstruct, as_unit(reference.train[span]), batch_size)
        chunk_features, chunk_confidence = reference._embedding(recon)
        features.append(chunk_features)
        confidence.append(chunk_confidence)
        if chosen is None:
            chosen = torch.empty((n, *recon.shape[1:]))
        here = (first >= span.start) & (first < span.stop)  # the first choice's, in its order
        chosen[here] = recon[first[here] - span.start]
    confidence = None if confidence[0] is None else np.concatenate(confidence)
    report = reference.report(chosen)
    means = reference._subset_means(np.concatenate(features), confidence, n)
    report.update(means, fd_ratio=means["fd"] / max(report["fd_real"], 1e-12))
    squared_errors, sizes = [], []  # the mean of each chunk, and its size
    for span in _spans(len(reference.heldout), chunk):
        heldout = as_unit(reference.heldout[span])
        error = reconstruct_all(reconstruct, heldout, batch_size) - heldout
        squared_errors.append(error.pow(2).mean().item())
        sizes.append(error.numel())
    mse = squared_errors[0] if len(sizes) == 1 else float(np.average(squared_errors,
                                                                     weights=sizes))
    return {**report, "psnr": 10 * math.log10(1 / max(mse, 1e-12))}


def run_ceiling(run_id, reference, precision="auto"):
    """`tokenizer_ceiling` of a tokenizer run (any kind; its best.pt, the checkpoint its codes
    come from), reconstructing in `precision` (auto | fp32 | bf16: the tokenizer's encode and
    decode; the judge's own features and classifier are always fp32, so the yardstick does not
    move with the precision); -> (figures, the checkpoint's step)."""
    tokenizer = load_tokenizer(run_id, "cpu", precision=precision)
    return tokenizer_ceiling(tokenizer.reconstruct, reference), tokenizer.step

# the ranking check's degradations


def gaussian_blur(images, sigma):
    """(N, C, S, S) blurred with a Gaussian of `sigma` pixels (reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images.float(), (radius,) * 4, mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)  # along rows
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)  # columns


DEGRADATIONS = ("real", "light_blur", "heavy_blur", "row_shuffle", "noise")


def degrade(images, kind, seed=0):
    """The ranking check's ladder, from best to worst: "real" (unchanged), "light_blur" (sigma
    = 1/32 of the side: 0.5 px at 16 px), "heavy_blur" (1/20 of the side: 0.8 px at 16 px,
    visibly soft but every digit still legible), "row_shuffle" (each image's rows in a random
    order: the pixel statistics of real images, none of their structure), "noise" (uniform in
    [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    if kind == "real":
        return images.float()
    if kind == "light_blur":
        return gaussian_blur(images, size / 32)
    if kind == "heavy_blur":
        return gaussian_blur(images, size / 20)
    if kind == "row_shuffle":
        order = torch.stack([torch.randperm(size, generator=generator) for _ in images])
        return torch.stack([image[:, rows] for image, rows in zip(images.float(), order)])
    if kind == "noise":
        return torch.rand(images.shape, generator=generator)
    raise ValueError(f"unknown degradation '{kind}' (one of {', '.join(DEGRADATIONS)})")


def ranking_ladder(reference, images, seed=0):
    """{degradation: reference.report(degrade(images, degradation))} for every rung."""
    return {kind: reference.report(degrade(images, kind, seed)) for kind in DEGRADATIONS}
