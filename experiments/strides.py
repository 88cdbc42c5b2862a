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
(tokens per call, summing to the grid's); `--choice_temperatures` repeats maskgit's rows at each
of its choice temperatures.

With `--gpt_run_id` (a GPT on the same tokenizer run) the GPT's own samples come first, drawn
the same way at `--gpt_temperature` and the same guidance, and every row says whether its
classifier confidence and precision are within 10% of the GPT's (at least 0.9 times them; the
absorbing prior's bar in issue 24), with both ratios. Choose settings with the tokenizer's
validation split or a CSV held out from training (`--heldout_csv`), and report them on another.
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


GPT_BAR = 0.9  # within 10% of the GPT: at least this share of its confidence and precision


def settings_to_try(samplers, strides, steps, lists, choice_temperatures=(None,)):
    """[{sampler, stride, steps (None: the stride's own), choice_temperature (maskgit only)}]:
    each named stride at each --steps (all: once), then the lists; maskgit's at each choice
    temperature."""
    rows = []
    for sampler in samplers:
        choices = choice_temperatures if sampler == "maskgit" else (None,)
        for choice in choices:
            tried = [(stride, None) if stride == "all" else (stride, s)
                     for stride in strides for s in ([None] if stride == "all" else steps)]
            rows += [{"sampler": sampler, "stride": stride, "steps": s,
                      "choice_temperature": choice}
                     for stride, s in tried + [(stride, None) for stride in lists]]
    return rows


def measure(prior, tokenizer, reference, setting, seeds, num_samples, ids, tone_samples):
    """The mean quality report of `seeds` draws of num_samples at `setting` (tone-matched by a
    curve fitted for it), and the mean seconds one draw's sampling took."""
    requested = [prior.classes[i] for i in ids.tolist()] if ids is not None else None
    tone = calibrate_tone(prior.model, tokenizer, prior.calibration_labels(tone_samples),
                          setting, tone_samples)
    draws, seconds = [], 0.0
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        codes = sample_tokens(prior.model, num_samples, num_samples, ids, generator, **setting)
        seconds += time.perf_counter() - start
        images = tokenizer.decode(codes)
        draws.append(tone(images) if tone else images)
    return report_draws(reference, draws, requested), seconds / len(seeds)


def against_gpt(report, gpt):
    """'yes (0.981, 1.034)': the row's confidence and precision as shares of the GPT's, and
    whether both reach GPT_BAR."""
    confidence = report["classifier_confidence"] / gpt["classifier_confidence"]
    precision = report["precision"] / gpt["precision"]
    verdict = "yes" if min(confidence, precision) >= GPT_BAR else "no"
    return f"{verdict} ({confidence:.3f}, {precision:.3f})"


def table_row(prior, sampler, stride, calls, r, seconds, verdict=None):
    """A markdown row of the table main() prints; `verdict`: the last column, if any."""
    cells = [prior, sampler, stride, str(calls),
             with_spread(r, "classifier_confidence", 3),
             f"{r['precision']:.2f} ({r['precision'] / r['real_precision']:.2f})",
             f"{r['recall']:.2f} ({r['recall'] / r['real_recall']:.2f})",
             with_spread(r, "fd_ratio", 2), f"{seconds:.3f}"]
    if verdict is not None:
        cells.append(verdict)
    return "| " + " | ".join(cells) + " |"


def main():
    sample = PRESETS["small"]["sample"]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", required=True, help="an absorbing prior run")
    parser.add_argument("--path_to_data", required=True, help="the training CSV")
    parser.add_argument("--heldout_csv", help="default: the tokenizer's validation split")
    parser.add_argument("--gpt_run_id", help="a GPT prior on the same tokenizer run: the "
                                             "reference row, and the 10%% verdict of every row")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--strides", nargs="+",
                        default=["magic", "even", "quadratic", "cosine", "all"])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--lists", nargs="*", default=[],
                        help="list strides such as 1,1,2,4,8 (tokens per call)")
    parser.add_argument("--choice_temperatures", type=float, nargs="+", default=[None],
                        help="maskgit's choice temperatures to try (default: its own)")
    parser.add_argument("--num_samples", type=int, default=sample["num_samples"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--temperature", type=float, default=sample["temperature"])
    parser.add_argument("--gpt_temperature", type=float, default=sample["temperature"])
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
    gpt = LoadedPrior(args.gpt_run_id, torch.device("cpu")) if args.gpt_run_id else None
    if gpt is not None and (gpt.family != "gpt" or gpt.tokenizer_run_id != prior.tokenizer_run_id
                            or gpt.classes != prior.classes):
        sys.exit(f"error: --gpt_run_id {args.gpt_run_id} must be a GPT on the absorbing prior's "
                 f"tokenizer run {prior.tokenizer_run_id}, with the same labels or none")
    tokenizer = with_training_quantiles(prior.tokenizer(), args.path_to_data)
    real, heldout, labels, heldout_labels = load_split_images(
        prior.tokenizer_run_id, args.path_to_data, args.heldout_csv)
    reference = QualityReference(heldout, real, labels, heldout_labels)
    ids, num_samples = prior.label_ids("all" if prior.classes else None, args.num_samples)
    guidance = None if not prior.classes or args.guidance == 1 else args.guidance
    base = {"temperature": args.temperature, "guidance": guidance}
    config = prior.model.config
    tokens = config.grid_h * config.grid_w
    measured = lambda loaded, setting: measure(loaded, tokenizer, reference, setting, args.seeds,
                                               num_samples, ids, args.tone_samples)

    print(f"prior {args.run_id[:8]}: {config.grid_h}x{config.grid_w} tokens, "
          f"{len(args.seeds)} draws of {num_samples}, "
          + ", ".join(f"{k} {v}" for k, v in base.items() if v is not None)
          + f", {torch.get_num_threads()} threads")
    print("| prior | sampler | stride | calls | confidence | precision (x real) | "
          "recall (x real) | FD ratio | s / batch |"
          + (" within 10% of GPT? (confidence, precision x GPT's) |" if gpt else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if gpt else ""))
    gpt_report = None
    if gpt is not None:
        gpt_report, seconds = measured(gpt, {"temperature": args.gpt_temperature,
                                             "guidance": guidance})
        print(table_row("gpt", "KV cache", "one token per call", tokens, gpt_report, seconds,
                        "(the reference)"), flush=True)
    for tried in settings_to_try(args.samplers, args.strides, args.steps, args.lists,
                                 args.choice_temperatures):
        r, seconds = measured(prior, {**base, **tried})
        sampler = tried["sampler"] + (f", choice {tried['choice_temperature']:g}"
                                      if tried["choice_temperature"] is not None else "")
        calls = len(stride_times(tried["stride"], tried["steps"], tokens))
        verdict = against_gpt(r, gpt_report) if gpt_report is not None else None
        print(table_row("absorbing", sampler, tried["stride"], calls, r, seconds, verdict),
              flush=True)


if __name__ == "__main__":
    main()
