"""Where a prior's Fréchet distance comes from: split by feature block and into its two terms,
for real training images, the tokenizer's reconstructions of them and the prior's samples.

    python -m experiments.fd_parts --run_id <prior> --path_to_data demo_data/train.csv
    python -m experiments.fd_parts ... --heldout_csv demo_data/heldout.csv  # the demo's judge

FD = |mu_a - mu_b|^2 (where the means differ) + tr(A + B - 2 (A B)^1/2) (where the spreads
differ). The blocks are those of the judge's joint space, scaled as there: the classifier's
features, and the random conv net's, split into its channel means ("random: texture": stroke
thickness, faint ink) and its 8x8 map of where the ink lies ("random: layout"); "all" is the
joint space the FD ratio is computed in (its terms are not the sum of the blocks': the blocks'
cross-covariances count too). Real images and reconstructions: means over 8 of the judge's
random choices of training images; samples: means over the draws (`--seeds`) at the given
sampling settings (default: the `small` preset's), tone-matched as generation does it
(`--tone_samples 0`: as decoded, which is where the faint ink shows).

Then the direction of the samples' mean offset from the reconstructions, in the texture block,
as cosines with (a) the reconstructions' offset from the real images (does the prior carry the
tokenizer's bias further?) and (b) the judged set's offset from the real images (1: the judged
images lie where the samples err; -1: opposite, which the FD punishes most); and pixel
statistics of each set. Without `--heldout_csv` the judged set is the validation split. This
is a diagnosis: choose settings on the validation split, and read the held-out split's figures
of a setting only once it is chosen.
"""

import argparse

import numpy as np
import torch

from experiments.common import with_training_quantiles
from pipeline.generate import TONE_SAMPLES, LoadedPrior, calibrate_tone, draws_of
from pipeline.quality import (QualityReference, frechet_parts, gaussian_stats,
                              reconstruct_all)
from pipeline.run import PRESETS, load_split_images

REAL_CHOICES = 8


def parts(reference, images):
    """{part name: (N, d) features} for the judge's blocks, the random one split in two."""
    blocks = reference.embed_blocks(images)
    out = {"all": np.concatenate(list(blocks.values()), 1)}  # = reference.embed(images)
    for name, features in blocks.items():
        if name == "random":  # random_features: channel means, then the 8x8 layout
            half = features.shape[1] // 2
            out["random: texture"], out["random: layout"] = features[:, :half], features[:, half:]
        else:
            out[name] = features
    return out


def pixel_stats(images):
    return (f"mean ink {images.mean():.4f}, blank pixels (< 0.05) "
            f"{(images < 0.05).float().mean():.4f}")


def cosine(a, b):
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def main():
    sample = PRESETS["small"]["sample"]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", required=True, help="prior run")
    parser.add_argument("--path_to_data", required=True, help="the training CSV")
    parser.add_argument("--heldout_csv", help="judge against it (default: the validation split)")
    parser.add_argument("--num_samples", type=int, default=sample["num_samples"])
    parser.add_argument("--temperature", type=float, default=sample["temperature"])
    parser.add_argument("--guidance", type=float, default=sample["guidance"])
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--tone_samples", type=int, default=TONE_SAMPLES,
                        help="tone matching's calibration draw, as generation fits it (0 = off: "
                             "the samples as decoded)")
    args = parser.parse_args()

    prior = LoadedPrior(args.run_id, "cpu")
    tokenizer = with_training_quantiles(prior.tokenizer(), args.path_to_data)
    real, judged, labels, judged_labels = load_split_images(tokenizer.run_id, args.path_to_data,
                                                            args.heldout_csv)
    reference = QualityReference(judged, real, labels, judged_labels)
    recon = reconstruct_all(tokenizer.reconstruct, real)
    guidance = args.guidance if prior.classes and args.guidance != 1 else None
    label_ids, num_samples = prior.label_ids("all" if prior.classes else None, args.num_samples)
    settings = {"temperature": args.temperature, "guidance": guidance, "top_p": args.top_p}
    tone = calibrate_tone(prior.model, tokenizer, prior.calibration_labels(args.tone_samples),
                          settings, args.tone_samples)
    draws = draws_of(prior.model, tokenizer, args.seeds, num_samples, label_ids, tone=tone,
                     **settings)
    n = len(draws[0])
    subsets = reference.real_subsets(min(n, len(real)))[:REAL_CHOICES]

    feats = {"real": parts(reference, real), "reconstructions": parts(reference, recon),
             "judged": parts(reference, judged)}
    sample_feats = [parts(reference, d) for d in draws]
    judged_name = "held-out" if args.heldout_csv else "validation"
    print(f"prior {args.run_id[:8]}: T {args.temperature}, guidance {guidance}, top-p "
          f"{args.top_p}, tone matching {'on' if tone else 'off'}; {len(draws)} draws of {n} "
          f"against {len(judged)} {judged_name} images")
    print("| block | real: means, spreads | reconstructions | samples | samples' excess over "
          "real |")
    print("|---|---|---|---|---|")
    for part, held in feats["judged"].items():
        stats = gaussian_stats(held)
        real_terms = np.mean([frechet_parts(feats["real"][part][s], stats) for s in subsets], 0)
        recon_terms = np.mean([frechet_parts(feats["reconstructions"][part][s], stats)
                               for s in subsets], 0)
        sample_terms = np.mean([frechet_parts(f[part], stats) for f in sample_feats], 0)
        cell = lambda t: f"{t[0]:.4f}, {t[1]:.4f}"
        excess = sample_terms - real_terms
        print(f"| {part} | {cell(real_terms)} | {cell(recon_terms)} | {cell(sample_terms)} | "
              f"{cell(excess)} |")

    texture = "random: texture"
    if texture in feats["real"]:
        pooled = np.concatenate([f[texture] for f in sample_feats]).mean(0)
        real_mean = feats["real"][texture].mean(0)
        recon_mean = feats["reconstructions"][texture].mean(0)
        prior_offset = pooled - recon_mean
        print(f"texture block, the samples' mean offset from the reconstructions: cosine "
              f"{cosine(prior_offset, recon_mean - real_mean):+.2f} with the reconstructions' "
              f"from the real images, "
              f"{cosine(prior_offset, feats['judged'][texture].mean(0) - real_mean):+.2f} with "
              f"the {judged_name} images'")
    for name, images in (("real", real), (judged_name, judged), ("reconstructions", recon),
                         ("samples", torch.cat(draws))):
        print(f"{name}: {pixel_stats(images)}")


if __name__ == "__main__":
    main()
