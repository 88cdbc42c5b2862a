"""Judge several priors by the pipeline's quality reference: the spread of a recipe over seeds.

    python -m experiments.judge_priors --run_ids <prior> <prior> ... \
        --path_to_data demo_data/train.csv --heldout_csv demo_data/heldout.csv

The same judge as `python -m pipeline` with a held-out CSV (every row of the training CSV as
real data, the judge's seed 0), so priors from other stores, other code versions or runs that
predate that judge are compared on one footing: what differs between the rows is the prior (and
its tokenizer) alone. Each row is the mean over `--seeds` draws of `--num_samples` at the
`small` preset's sampling settings (or `--temperature`, `--guidance`), each class in turn.
Compare priors by it; choose nothing by it, since these are the held-out images.

Samples are tone-matched by the curve generation fits (`--tone_samples`; 0 = as decoded); a
tokenizer trained before tone matching takes its training quantiles from its split of
`--path_to_data`.

`--mixture` also judges the listed priors (which must share a tokenizer) as one ensemble: at
each position it draws from the mean of their next-code distributions, each with guidance
applied to it before the mean. Without `--heldout_csv`, each prior is judged on its tokenizer's
validation split instead (the split where settings may be chosen).
"""

import argparse
import math
import sys

import torch
import torch.nn as nn

from experiments.common import with_training_quantiles
from pipeline.generate import TONE_SAMPLES, LoadedPrior, calibrate_tone, draws_of
from pipeline.quality import QualityReference, report_draws, with_spread
from pipeline.run import PRESETS, load_split_images
from priors.sampling import sample_raster


class Mixture(nn.Module):
    """Raster priors drawn as one: each position's distribution is the mean of the members'
    (guided) ones. The members run side by side on the same tokens."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        first = members[0]
        self.config, self.head, self.positions = first.config, first.head, first.positions
        self.labels_for, self.family = first.labels_for, first.family

    def begin(self, batch, labels):
        return [member.begin(batch, labels) for member in self.members]

    def step(self, state, p, tokens):
        # (members, batch, K) log-probabilities -> log of their mean, as the head's logits
        log_p = torch.stack([member.step(s, p, tokens).float().log_softmax(-1)
                             for member, s in zip(self.members, state)])
        return torch.logsumexp(log_p, 0) - math.log(len(self.members))

    def sample(self, n, labels=None, temperature=1.0, top_k=None, top_p=None, guidance=None,
               generator=None, **_):
        return sample_raster(self, n, labels, None, None, temperature, top_k, top_p, guidance,
                             generator)


def main():
    sample = PRESETS["small"]["sample"]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_ids", nargs="+", required=True, help="conditional prior runs")
    parser.add_argument("--path_to_data", required=True, help="the labelled training CSV")
    parser.add_argument("--heldout_csv", help="default: each tokenizer's validation split")
    parser.add_argument("--num_samples", type=int, default=sample["num_samples"])
    parser.add_argument("--temperature", type=float, default=sample["temperature"])
    parser.add_argument("--guidance", type=float, default=sample["guidance"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--tone_samples", type=int, default=TONE_SAMPLES,
                        help="tone matching's calibration draw, as generation fits it (0 = off)")
    parser.add_argument("--mixture", action="store_true",
                        help="also judge the priors as one ensemble (one tokenizer)")
    args = parser.parse_args()

    references = {}

    def reference_for(tokenizer_run):
        # the pipeline's own loader: with a held-out CSV every training row is real data, so
        # the tokenizer only sets the image size and channels (and the judge is shared)
        key = None if args.heldout_csv else tokenizer_run
        if key not in references:
            real, heldout, labels, heldout_labels = load_split_images(
                tokenizer_run, args.path_to_data, args.heldout_csv)
            references[key] = QualityReference(heldout, real, labels, heldout_labels)
        return references[key]

    def print_row(name, reference, draws, requested):
        r = report_draws(reference, draws, requested)
        print(f"| {name} | {with_spread(r, 'fd_ratio', 3)} | "
              f"{r['precision']:.2f} ({r['precision'] / r['real_precision']:.3f}) | "
              f"{r['recall']:.2f} ({r['recall'] / r['real_recall']:.3f}) | "
              f"{with_spread(r, 'classifier_confidence', 3)} | {r['classes_present']:.1f} | "
              f"{r['nn_ratio']:.2f} |", flush=True)

    print("| prior | FD ratio | precision (x real) | recall (x real) | confidence | classes | "
          "nn ratio |")
    print("|---|---|---|---|---|---|---|")
    settings = {"temperature": args.temperature,
                "guidance": None if args.guidance == 1 else args.guidance}
    priors = [LoadedPrior(run_id, "cpu") for run_id in args.run_ids]
    # (name, model to draw from, the prior whose classes and tokenizer it uses)
    rows = [(run_id[:8], prior.model, prior) for run_id, prior in zip(args.run_ids, priors)]
    if args.mixture:
        if len({prior.tokenizer_run_id for prior in priors}) > 1:
            sys.exit("--mixture: the priors must share one tokenizer run")
        rows.append(("mixture", Mixture([prior.model for prior in priors]).eval(), priors[0]))
    for name, model, prior in rows:
        ids, num_samples = prior.label_ids("all", args.num_samples)
        tokenizer = with_training_quantiles(prior.tokenizer(), args.path_to_data)
        tone = calibrate_tone(model, tokenizer, prior.calibration_labels(args.tone_samples),
                              settings, args.tone_samples)
        draws = draws_of(model, tokenizer, args.seeds, num_samples, ids, tone=tone, **settings)
        print_row(name, reference_for(prior.tokenizer_run_id), draws,
                  [prior.classes[i] for i in ids.tolist()])


if __name__ == "__main__":
    main()
