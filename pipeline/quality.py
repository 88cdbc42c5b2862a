"""Offline sample-quality figures: nothing is downloaded, everything is computed from the data.

- Fréchet distance (FD) between generated and held-out real images in the feature space of a
  fixed, seeded random conv net (no pretrained weights exist offline; random conv features still
  separate image distributions, cf. Naeem et al. 2020). Reported with the FD of an equal number
  of *real training* images to the same held-out set, the floor a perfect generator reaches:
  `fd_ratio` = FD(samples) / FD(real) is ~1 for a perfect model.
- Memorisation: the pixel-space distance from each sample to its nearest training image,
  relative to the same distance for held-out images (`nn_ratio` ~1: as novel as new real data;
  << 1: copies). `copy_fraction`: samples closer to a training image than 95% of held-out
  images are.
- When the CSV has labels: a logistic-regression classifier fit on the training images says
  which classes the samples look like (`classes_present`, mean `classifier_confidence`).
"""

import numpy as np
import torch
import torch.nn.functional as F


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


def _sqrtm_psd(matrix):
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a, b):
    """FD between Gaussians fit to feature sets a (N, d) and b (M, d)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)  # tr sqrt(A B) = tr sqrt(A^1/2 B A^1/2)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.trace(cross))


def nearest_distances(queries, references, batch=512):
    """Pixel-space L2 distance from each query to its nearest reference image."""
    q, r = queries.flatten(1).float(), references.flatten(1).float()
    return torch.cat([torch.cdist(q[i:i + batch], r).min(1).values
                      for i in range(0, len(q), batch)]).numpy()


def quality_report(samples, heldout, train, train_labels=None, seed=0):
    """All images (N, C, S, S) in [0, 1]. Returns a flat dict of figures (see module doc)."""
    rng = np.random.default_rng(seed)
    n = min(len(samples), len(train))
    real = train[torch.from_numpy(rng.choice(len(train), n, replace=False))]
    features_heldout = random_features(heldout)
    fd_samples = frechet_distance(random_features(samples), features_heldout)
    fd_real = frechet_distance(random_features(real), features_heldout)
    nn_samples = nearest_distances(samples, train)
    nn_heldout = nearest_distances(heldout, train)
    report = {"fd": fd_samples, "fd_real": fd_real, "fd_ratio": fd_samples / max(fd_real, 1e-12),
              "nn_ratio": float(np.median(nn_samples) / max(np.median(nn_heldout), 1e-12)),
              "copy_fraction": float((nn_samples < np.percentile(nn_heldout, 5)).mean()),
              "num_samples": len(samples), "num_heldout": len(heldout)}
    if train_labels is not None:
        report.update(classifier_report(samples, heldout, train, train_labels))
    return report


def classifier_report(samples, heldout, train, train_labels):
    from sklearn.linear_model import LogisticRegression
    labels = np.asarray([str(v) for v in train_labels])
    classifier = LogisticRegression(max_iter=2000, C=0.1)
    classifier.fit(train.flatten(1).numpy(), labels)
    probs = classifier.predict_proba(samples.flatten(1).numpy())
    predicted = classifier.classes_[probs.argmax(1)]
    counts = {str(c): int((predicted == c).sum()) for c in classifier.classes_}
    return {"classes_present": int(sum(v > 0 for v in counts.values())),
            "num_classes": len(classifier.classes_),
            "classifier_confidence": float(probs.max(1).mean()),
            "class_counts": counts}
