"""Pick sampling settings on the VALIDATION split: the quality figures of a prior's samples for
every combination of temperature / top-k / top-p / guidance, judged against the rows of the
training CSV that the VQ-VAE and the prior held out (their shared `val_fraction` split), never
against a held-out CSV.

    python -m experiments.sweep_sampling --run_id <prior> --path_to_data demo_data/train.csv \
        --temperature 0.8 1.0 --top_k 0 32 --guidance 1 2 3 --seeds 0 1

Samples are tone-matched by the curve generation fits for each setting (`--tone_samples 0`:
as decoded). A conditional prior samples each class in turn (`--labels all`); top_k 0 means no
top-k, top_p 1 no top-p, guidance 1 plain conditional sampling. Each row is the mean over the
seeds (FD ratio and confidence also give the seeds' standard deviation); `ok` marks the
settings that reach issue 12's targets on this split (confidence >= 0.90, every class,
precision and recall >= 0.9 x the real reference's, FD ratio <= 1.3, nn ratio >= 0.9). The
first row is the tokenizer's ceiling on the same split (a perfect prior over its codes).

Read the FD ratio here for ranking settings, not against the 1.3 target: with 150 validation
images in the 256-d feature space it runs lower than on a larger held-out set (1.13 here, 1.36
on the demo's 297 held-out digits, for the same prior and settings), so `ok` here is necessary,
not sufficient. It is also noisy: one prior read 1.07 here and 1.63 on the held-out digits,
another 1.27 and 1.51. `FD to train` has far less noise: the Fréchet distance of all the
seeds' samples pooled (2,400 by default) against every training image (1,350 on the demo), in
the same space. It sees the samples' systematic offsets from the data the prior learned, such
as the extra faint ink of a high temperature (docs/results.md). Use it to rank
the sampling settings of one prior. Do not use it to rank training recipes, since a prior that
memorised its training images would score best; the nn ratio tells those apart.
"""

import argparse
import itertools
import time

import torch

from experiments.common import with_training_quantiles
from pipeline.generate import (TONE_SAMPLES, LoadedPrior, calibrate_tone,
                               sample_tokens)
from pipeline.quality import (QualityReference, frechet_distance, gaussian_stats,
                              reconstruct_all, report_draws, tokenizer_ceiling, with_spread)
from pipeline.run import load_split_images

COLUMNS = ("conf", "classes", "P", "R", "P/real", "R/real", "FD ratio", "FD to train", "nn ratio",
           "agree")


def meets_targets(row):
    return (row["classifier_confidence"] >= 0.90 and row["classes_present"] == row["num_classes"]
            and row["precision"] >= 0.9 * row["real_precision"]
            and row["recall"] >= 0.9 * row["real_recall"]
            and row["fd_ratio"] <= 1.3 and row["nn_ratio"] >= 0.9)


def format_row(name, row):
    cells = [with_spread(row, "classifier_confidence", 3), f"{row['classes_present']:.0f}",
             f"{row['precision']:.3f}", f"{row['recall']:.3f}",
             f"{row['precision'] / row['real_precision']:.2f}",
             f"{row['recall'] / row['real_recall']:.2f}", with_spread(row, "fd_ratio", 2),
             f"{row['fd_train']:.4f}", f"{row['nn_ratio']:.2f}",
             f"{row['label_agreement']:.2f}" if "label_agreement" in row else "-"]
    return f"| {name} | " + " | ".join(cells) + f" | {'ok' if meets_targets(row) else ''} |"


def fd_to_train(reference, images, train_stats):
    """FD of images (N, C, S, S), every draw pooled, against all training images (their
    gaussian_stats in the reference's space)."""
    return frechet_distance(reference.embed(images), train_stats)


def sweep(prior, tokenizer, reference, settings, num_samples, seeds, extra, train_stats,
          tone_samples):
    """-> [(setting dict, mean report, seconds sampling per seed)] for every setting; each
    setting's draws are tone-matched by a curve fitted for it, as generation fits one."""
    classes = prior.classes
    label_ids = (torch.arange(num_samples) % len(classes)) if classes else None
    requested = [classes[i] for i in label_ids.tolist()] if classes else None
    results = []
    for setting in settings:
        tone = calibrate_tone(prior.model, tokenizer, prior.calibration_labels(tone_samples),
                              {**setting, **extra}, tone_samples)
        draws, seconds = [], 0.0
        for seed in seeds:
            generator = torch.Generator(device=prior.device).manual_seed(seed)
            start = time.perf_counter()
            codes = sample_tokens(prior.model, num_samples, num_samples, label_ids, generator,
                                  **setting, **extra)
            seconds += time.perf_counter() - start
            draws.append(tone(tokenizer.decode(codes)) if tone else tokenizer.decode(codes))
        row = report_draws(reference, draws, requested)
        row["fd_train"] = fd_to_train(reference, torch.cat(draws), train_stats)
        results.append((setting, row, seconds / len(seeds)))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", nargs="+", required=True, help="prior run(s)")
    parser.add_argument("--path_to_data", required=True,
                        help="the training CSV (its validation rows are the reference)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    parser.add_argument("--top_k", type=int, nargs="+", default=[0], help="0 = off")
    parser.add_argument("--top_p", type=float, nargs="+", default=[1.0], help="1 = off")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                        help="conditional priors only; 1 = plain conditional")
    parser.add_argument("--steps", type=int, help="absorbing prior: network evaluations")
    parser.add_argument("--sampler", help="absorbing prior: absorbing | maskgit")
    parser.add_argument("--num_samples", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tone_samples", type=int, default=TONE_SAMPLES,
                        help="tone matching's calibration draw per setting (0 = off)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    extra = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler)) if v is not None}
    reference, ceiling_done = None, set()
    print("| setting | " + " | ".join(COLUMNS) + " | targets |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for run_id in args.run_id:
        prior = LoadedPrior(run_id, torch.device("cpu"))
        tokenizer = with_training_quantiles(prior.tokenizer(), args.path_to_data)
        if reference is None or tokenizer.run_id not in ceiling_done:
            train, val, train_labels, val_labels = load_split_images(tokenizer.run_id,
                                                                     args.path_to_data)
            reference = QualityReference(val, train, train_labels, val_labels)
            train_stats = gaussian_stats(reference.embed(train))
            reconstruct = tokenizer.reconstruct
            ceiling = tokenizer_ceiling(reconstruct, reference)
            ceiling["fd_train"] = fd_to_train(reference, reconstruct_all(reconstruct, train),
                                              train_stats)
            print(format_row(f"ceiling of {tokenizer.run_id[:8]} ({len(val)} val images, "
                             f"PSNR {ceiling['psnr']:.1f} dB)", ceiling))
            ceiling_done.add(tokenizer.run_id)
        guidances = args.guidance if prior.classes else [1.0]
        settings = [{"temperature": t, "top_k": k or None, "top_p": None if p >= 1 else p,
                     "guidance": None if g == 1 else g}
                    for t, k, p, g in itertools.product(args.temperature, args.top_k,
                                                        args.top_p, guidances)]
        for setting, row, seconds in sweep(prior, tokenizer, reference, settings,
                                           args.num_samples, args.seeds, extra, train_stats,
                                           args.tone_samples):
            name = f"{run_id[:8]} " + " ".join(f"{k}={v}" for k, v in setting.items()
                                               if v is not None)
            print(format_row(f"{name} ({seconds:.1f} s)", row), flush=True)


if __name__ == "__main__":
    main()
