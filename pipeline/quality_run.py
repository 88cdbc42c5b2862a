"""`python -m pipeline quality`: the pipeline's quality figures for any prior, as an evaluation run.

    python -m pipeline quality --run_id <prior run | models:/NAME/VERSION | models:/NAME@alias>
        --path_to_data heldout.csv [--num_samples N] [--draws D] [--seed S] [--sample.<flag> V]

The same judge as the one command's quality step (pipeline/quality.py): samples of the prior,
tone-matched and decoded by its tokenizer, against held-out real images, with every row of the
tokenizer's training CSV as the real reference: FD ratio, precision, recall, the nearest-train
ratio, the classifier's confidence and the drawn class's agreement where there are labels, and
the tokenizer's ceiling (what a perfect prior over its codes would reach). Each figure is the
mean over --draws draws (seeds S, S+1, ...), with its spread.

Sampling settings: those of the pipeline run that trained the prior (its `sample.*` params),
so the figures are the ones that run printed; else the family's defaults. `--sample.<flag>`
overrides either.

The figures go to a new run (stage `quality`, tag `pipeline.prior_run_id`) whose inputs are the
held-out CSV and, where the prior logged one, its model; the metrics are linked to that model
and name the held-out data set, so the experiment's Models tab ranks generators by them. (The
drawing and the evaluation run are pipeline/ranking.py's, which also judges a champion that
has no figure on a new version's held-out data.)
"""

import argparse
import sys
from pathlib import Path

import priors
from core.config import add_flags, given
from core.errors import UserError
from pipeline import describe, tracking
from pipeline.device import PRECISION_HELP, PRECISIONS, pick_device
from pipeline.generate import LoadedPrior
from pipeline.images import read_source
from pipeline.quality import QualityReference, run_ceiling, with_spread
from pipeline.ranking import (draw_figures, log_evaluation, pipeline_settings,
                              typed_settings)
from pipeline.run import judged_images, tokenizer_split

DEFAULT_SAMPLES = 300  # the small preset's
DEFAULT_DRAWS = 8  # the one command's --quality_draws


def judge(run_id, heldout_csv, num_samples=None, draws=None, seed=None, settings=None,
          train_csv=None, device=None, experiment=None, precision="auto"):
    """The quality figures of a prior run against `heldout_csv`, logged to a new run; the
    samples and reconstructions in `precision` (pipeline/device.py; param `precision`).
    -> (the evaluation run id, {figure: value})."""
    prior = LoadedPrior(run_id, pick_device(device), precision=precision)
    run_id = prior.run_id
    if not prior.tokenizer_run_id:
        raise UserError(f"--run_id {run_id}: the prior was trained from a local codes file; "
                        f"its images cannot be decoded or judged")
    recorded, recorded_draws = pipeline_settings(prior.run)
    draws = draws or recorded_draws or DEFAULT_DRAWS
    if draws < 1:
        raise UserError(f"--draws must be at least 1, got {draws}")
    chosen = {**recorded, **{k: v for k, v in (settings or {}).items() if v is not None}}
    num_samples = num_samples or int(chosen.get("num_samples", DEFAULT_SAMPLES))
    seed = int(chosen.get("seed", 0)) if seed is None else seed
    # a setting the family does not take fails here, before the reference is built
    priors.sampling_settings(prior.family, typed_settings(prior.family, chosen))

    tokenizer_config = tracking.load_json_artifact(prior.tokenizer_run_id, "config.json")
    recorded_csv = tokenizer_config["train"].get("path_to_data")
    if train_csv is None and not (recorded_csv and Path(recorded_csv).exists()):
        raise UserError(f"the tokenizer run {prior.tokenizer_run_id} was trained on "
                        f"'{recorded_csv}', which is not here: give --train_csv (the real "
                        f"reference)")
    train_csv = train_csv or recorded_csv
    source, heldout = read_source(train_csv), read_source(heldout_csv)
    train_images, heldout_images, train_labels, heldout_labels = judged_images(
        *tokenizer_split(prior.tokenizer_run_id, source), heldout)
    reference = QualityReference(heldout_images, train_images, train_labels, heldout_labels)
    ceiling, _ = run_ceiling(prior.tokenizer_run_id, reference, prior.precision)
    figures, used = draw_figures(prior, reference, chosen, num_samples, draws, seed)
    figures.update({f"ceiling/{k}": v for k, v in ceiling.items()})

    (heldout_input,) = describe.csv_inputs(heldout.table.data_path, heldout.sha256,
                                           {"evaluation": range(len(heldout.table.paths))})
    params = describe.run_params(
        {"prior_run_id": run_id, "heldout": str(heldout_csv), "train_csv": str(train_csv),
         "num_samples": used["num_samples"], "draws": draws, "seed": seed,
         "labels": used["labels"], "precision": prior.precision},
        {f"sample.{k}": v for k, v in used["sampling"].items()})
    command = " ".join(["python -m pipeline quality", "--run_id", run_id, "--path_to_data",
                        str(heldout_csv)])
    eval_run = log_evaluation(prior, figures, params, heldout_input, command,
                              f"`{heldout_csv}` (under *Datasets*)", experiment,
                              reference=reference.fingerprint)
    return eval_run, figures


def summary_line(figures):
    mean = lambda name, digits: with_spread({f"quality/{k}": v for k, v in figures.items()},
                                            f"quality/{name}", digits)
    parts = [f"FD ratio {mean('fd_ratio', 3)}", f"precision {mean('precision', 2)}",
             f"recall {mean('recall', 2)}", f"nearest-train ratio {figures['nn_ratio']:.2f}"]
    if "classifier_confidence" in figures:
        parts.append(f"classifier confidence {mean('classifier_confidence', 3)}")
    if "label_agreement" in figures:
        parts.append(f"drawn class recognised in {mean('label_agreement', 3)}")
    if "ceiling/fd_ratio" in figures:
        parts.append(f"ceiling FD ratio {figures['ceiling/fd_ratio']:.3f}")
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pipeline quality",
        description="The pipeline's quality figures for a prior run or registered model, "
                    "against a held-out CSV, logged to a new evaluation run.")
    parser.add_argument("--run_id", required=True,
                        help="the prior run, or models:/NAME/VERSION, models:/NAME@alias")
    parser.add_argument("--path_to_data", required=True,
                        help="CSV or folder of held-out images")
    parser.add_argument("--train_csv", help="the real reference: the tokenizer's training CSV "
                                            "or folder (default: the path its run recorded)")
    parser.add_argument("--num_samples", type=int,
                        help="samples per draw (default: the pipeline run's, else 300)")
    parser.add_argument("--draws", type=int,
                        help="draws to average over (default: the pipeline run's, else 8)")
    parser.add_argument("--seed", type=int, help="the first draw's seed (default: the "
                                                 "pipeline run's, else 0)")
    parser.add_argument("--labels", help="'all' (each class in turn) or '3,3,7'")
    parser.add_argument("--device")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    parser.add_argument("--experiment")
    args, rest = parser.parse_known_args(argv)
    run_id = tracking.resolve_run_id(args.run_id)
    family = tracking.get_run(run_id, "prior").data.tags.get(tracking.PRIOR_TAG, "gpt")
    # the family's sampling settings, as --sample.<flag> (priors/settings.py)
    sample = argparse.ArgumentParser(prog="python -m pipeline quality")
    add_flags(sample, priors.sampling_class(family), prefix="sample.")
    settings = given(sample.parse_args(rest), priors.sampling_class(family), "sample.")
    if args.labels:
        settings["labels"] = args.labels
    eval_run, figures = judge(run_id, args.path_to_data, args.num_samples, args.draws, args.seed,
                              settings, args.train_csv, args.device, args.experiment,
                              args.precision)
    print(summary_line(figures), file=sys.stderr)
    print(f"run_id={eval_run}")
