"""Judge several priors by the pipeline's quality reference: the spread of a recipe over seeds.

    python benchmarks/judge_priors.py --run_ids <prior> <prior> ... \
        --path_to_data demo_data/train.csv --heldout_csv demo_data/heldout.csv

The same judge as `python -m pipeline` with a held-out CSV (every row of the training CSV as
real data, the judge's seed 0), so priors from other stores, other code versions or runs that
predate that judge are compared on one footing: what differs between the rows is the prior (and
its tokenizer) alone. Each row is the mean over `--seeds` draws of `--num_samples` at the
`small` preset's sampling settings (or `--temperature`, `--guidance`), each class in turn.
Compare priors by it; choose nothing by it, since these are the held-out images.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.generate import LoadedPrior, more_draws  # noqa: E402
from pipeline.quality import QualityReference, report_draws, with_spread  # noqa: E402
from pipeline.run import PRESETS, load_split_images  # noqa: E402


def main():
    sample = PRESETS["small"]["sample"]
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_ids", nargs="+", required=True, help="conditional prior runs")
    parser.add_argument("--path_to_data", required=True, help="the labelled training CSV")
    parser.add_argument("--heldout_csv", required=True)
    parser.add_argument("--num_samples", type=int, default=sample["num_samples"])
    parser.add_argument("--temperature", type=float, default=sample["temperature"])
    parser.add_argument("--guidance", type=float, default=sample["guidance"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    args = parser.parse_args()

    # the pipeline's own loader: with a held-out CSV every training row is real data, so the
    # first prior's tokenizer only sets the image size and channels
    tokenizer_run = LoadedPrior(args.run_ids[0], "cpu").tokenizer_run_id
    real, heldout, labels, heldout_labels = load_split_images(tokenizer_run, args.path_to_data,
                                                              args.heldout_csv)
    reference = QualityReference(heldout, real, labels, heldout_labels)
    print("| prior | FD ratio | precision (x real) | recall (x real) | confidence | classes | "
          "nn ratio |")
    print("|---|---|---|---|---|---|---|")
    for run_id in args.run_ids:
        prior = LoadedPrior(run_id, "cpu")
        ids, num_samples = prior.label_ids("all", args.num_samples)
        requested = [prior.classes[i] for i in ids.tolist()]
        draws = more_draws(run_id, args.seeds, num_samples, None, "all",
                           temperature=args.temperature, guidance=args.guidance)
        r = report_draws(reference, draws, requested)
        print(f"| {run_id[:8]} | {with_spread(r, 'fd_ratio', 3)} | "
              f"{r['precision']:.2f} ({r['precision'] / r['real_precision']:.3f}) | "
              f"{r['recall']:.2f} ({r['recall'] / r['real_recall']:.3f}) | "
              f"{with_spread(r, 'classifier_confidence', 3)} | {r['classes_present']:.1f} | "
              f"{r['nn_ratio']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
