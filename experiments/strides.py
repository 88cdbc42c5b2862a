"""Quality x sampling time of the absorbing prior's strides (transformer/absorbing.py, Strides):
for each sampler, stride and number of network calls, the pipeline's quality figures of the
samples and the wall time of one batch.

    python -m experiments.strides --run_id <absorbing prior> --path_to_data demo_data/train.csv \
        --heldout_csv demo_data/heldout.csv

Judged as experiments/judge_priors.py judges: with `--heldout_csv` every row of the training CSV
is real data and the held-out CSV is the reference (without it, the tokenizer's validation
split). Each row is the mean over `--seeds` draws of `--num_samples` (each class in turn for a
conditional prior) at the `small` preset's temperature and guidance unless given, tone-matched
by the curve generation fits for each setting (`--tone_samples 0`: as decoded). `s / batch` is
the mean wall time of one draw of `--num_samples` grids in one batch, tone matching and decoding
excluded. The rows differ only in the stride and --steps: `--steps` is the calls of magic, even,
quadratic and cosine; `all` makes one call per token; each `--lists` entry is a list stride
(tokens per call, summing to the grid's).
"""

import argparse
import sys
import time

import torch

from experiments.common import with_training_quantiles
from pipeline.generate import TONE_SAMPLES, LoadedPrior, calibrate_tone, sample_tokens
from pipeline.quality import QualityReference, report_draws, with_spread
from pipeline.run import PRESETS, load_split_images
from transformer.absorbing import SAMPLERS, stride_times


def settings_to_try(samplers, strides, steps, lists):
    """[(sampler, stride, steps or None)]: each named stride at each --steps (all: once), then
    the lists."""
    rows = []
    for sampler in samplers:
        for stride in strides:
            rows += ([(sampler, stride, None)] if stride == "all" else
                     [(sampler, stride, s) for s in steps])
        rows += [(sampler, stride, None) for stride in lists]
    return rows


def main():
    sample = PRESETS["small"]["sample"]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", required=True, help="an absorbing prior run")
    parser.add_argument("--path_to_data", required=True, help="the training CSV")
    parser.add_argument("--heldout_csv", help="default: the tokenizer's validation split")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--strides", nargs="+",
                        default=["magic", "even", "quadratic", "cosine", "all"])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--lists", nargs="*", default=[],
                        help="list strides such as 1,1,2,4,8 (tokens per call)")
    parser.add_argument("--num_samples", type=int, default=sample["num_samples"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--temperature", type=float, default=sample["temperature"])
    parser.add_argument("--guidance", type=float, default=sample["guidance"],
                        help="conditional priors; 1 = plain conditional")
    parser.add_argument("--tone_samples", type=int, default=TONE_SAMPLES,
                        help="tone matching's calibration draw per setting (0 = off)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prior = LoadedPrior(args.run_id, torch.device("cpu"))
    if prior.family != "absorbing":
        sys.exit(f"error: --run_id {args.run_id} is a {prior.family} prior; strides are the "
                 f"absorbing prior's")
    tokenizer = with_training_quantiles(prior.tokenizer(), args.path_to_data)
    real, heldout, labels, heldout_labels = load_split_images(
        prior.tokenizer_run_id, args.path_to_data, args.heldout_csv)
    reference = QualityReference(heldout, real, labels, heldout_labels)
    ids, num_samples = prior.label_ids("all" if prior.classes else None, args.num_samples)
    requested = [prior.classes[i] for i in ids.tolist()] if prior.classes else None
    base = {"temperature": args.temperature,
            "guidance": None if not prior.classes or args.guidance == 1 else args.guidance}
    config = prior.model.config
    tokens = config.grid_h * config.grid_w

    print(f"prior {args.run_id[:8]}: {config.grid_h}x{config.grid_w} tokens, "
          f"{len(args.seeds)} draws of {num_samples}, "
          + ", ".join(f"{k} {v}" for k, v in base.items() if v is not None)
          + f", {torch.get_num_threads()} threads")
    print("| sampler | stride | calls | FD ratio | precision (x real) | recall (x real) | "
          "confidence | s / batch |")
    print("|---|---|---|---|---|---|---|---|")
    for sampler, stride, steps in settings_to_try(args.samplers, args.strides, args.steps,
                                                  args.lists):
        setting = {**base, "sampler": sampler, "stride": stride, "steps": steps}
        tone = calibrate_tone(prior.model, tokenizer, prior.calibration_labels(args.tone_samples),
                              setting, args.tone_samples)
        draws, seconds = [], 0.0
        for seed in args.seeds:
            generator = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            codes = sample_tokens(prior.model, num_samples, num_samples, ids, generator,
                                  **setting)
            seconds += time.perf_counter() - start
            images = tokenizer.decode(codes)
            draws.append(tone(images) if tone else images)
        r = report_draws(reference, draws, requested)
        calls = len(stride_times(stride, steps, tokens))
        print(f"| {sampler} | {stride} | {calls} | {with_spread(r, 'fd_ratio', 2)} | "
              f"{r['precision']:.2f} ({r['precision'] / r['real_precision']:.2f}) | "
              f"{r['recall']:.2f} ({r['recall'] / r['real_recall']:.2f}) | "
              f"{with_spread(r, 'classifier_confidence', 3)} | "
              f"{seconds / len(args.seeds):.3f} |", flush=True)


if __name__ == "__main__":
    main()
