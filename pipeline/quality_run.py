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
and name the held-out data set, so the experiment's Models tab ranks generators by them.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import priors
from core.config import add_flags, field_type, given
from core.errors import UserError
from pipeline import describe, tracking
from pipeline.device import PRECISION_HELP, PRECISIONS, pick_device
from pipeline.generate import TONE_SAMPLES, LoadedPrior, draws_of, prior_tone
from pipeline.images import read_source
from pipeline.quality import QualityReference, report_draws, run_ceiling, with_spread
from pipeline.run import judged_images, tokenizer_split

STAGE = "quality"
PRIOR_RUN_TAG = "pipeline.prior_run_id"
DEFAULT_SAMPLES = 300  # the small preset's
DEFAULT_DRAWS = 8  # the one command's --quality_draws


def pipeline_settings(prior_run):
    """(the sampling settings {name: value} the one command used for this prior, from its
    parent pipeline run's `sample.*` params, and its number of quality draws); ({}, None) for
    a prior trained on its own."""
    parent = prior_run.data.tags.get("mlflow.parentRunId")
    if not parent:
        return {}, None
    data = tracking.client().get_run(parent).data
    draws = data.metrics.get("quality/draws")
    return ({k.split(".", 1)[1]: v for k, v in data.params.items() if k.startswith("sample.")},
            int(draws) if draws else None)


def _typed(family, settings):
    """Params are strings: give each sampling setting its field's type (None for 'None')."""
    kinds = {f.name: field_type(f) for f in dataclasses.fields(priors.sampling_class(family))}
    out = {}
    for name, value in settings.items():
        if name in kinds:
            out[name] = None if value in (None, "None") else kinds[name](value)
    return out


def logged_model_id(run_id):
    """The id of the generator model a prior run logged (None when it logged none)."""
    try:
        models = tracking.client().search_logged_models(
            experiment_ids=[tracking.client().get_run(run_id).info.experiment_id],
            filter_string=f"source_run_id = '{run_id}'")
    except Exception:  # a store without logged models (an old server): nothing to link
        return None
    return models[0].model_id if models else None


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
    labels = chosen.get("labels", "all" if prior.classes else None)
    labels = None if labels in (None, "None") or not prior.classes else labels
    sampling = priors.sampling_settings(prior.family, _typed(prior.family, chosen))
    drawn = dataclasses.asdict(sampling)  # what the prior's sample() takes

    tokenizer_config = tracking.load_json_artifact(prior.tokenizer_run_id, "config.json")
    recorded_csv = tokenizer_config["train"].get("path_to_data")
    if train_csv is None and not (recorded_csv and Path(recorded_csv).is_file()):
        raise UserError(f"the tokenizer run {prior.tokenizer_run_id} was trained on "
                        f"'{recorded_csv}', which is not here: give --train_csv (the real "
                        f"reference)")
    train_csv = train_csv or recorded_csv
    source, heldout = read_source(train_csv), read_source(heldout_csv)
    train_images, heldout_images, train_labels, heldout_labels = judged_images(
        *tokenizer_split(prior.tokenizer_run_id, source), heldout)
    reference = QualityReference(heldout_images, train_images, train_labels, heldout_labels)
    ceiling, _ = run_ceiling(prior.tokenizer_run_id, reference, prior.precision)

    tokenizer = prior.tokenizer()
    label_ids, num_samples = prior.label_ids(labels, num_samples)
    tone = prior_tone(prior, tokenizer, drawn, TONE_SAMPLES)
    images = draws_of(prior.model, tokenizer, range(seed, seed + draws), num_samples, label_ids,
                      None, tone, prior.precision, **drawn)
    requested = [prior.classes[i] for i in label_ids.tolist()] if label_ids is not None else None
    figures = report_draws(reference, images, requested)
    figures.update({f"ceiling/{k}": v for k, v in ceiling.items()})

    # the evaluation run
    heldout_input = describe.csv_inputs(heldout.table.csv_path, heldout.sha256,
                                        {"evaluation": range(len(heldout.table.paths))})
    model_id = logged_model_id(run_id)
    command = " ".join(["python -m pipeline quality", "--run_id", run_id, "--path_to_data",
                        str(heldout_csv)])
    note = describe.description(
        f"Quality of prior run `{run_id}` ({prior.family}) against held-out images",
        command=command, data=f"`{heldout_csv}` (under *Datasets*)")
    eval_run = tracking.create_run(STAGE, experiment, run_name=f"quality {prior.family}",
                                   tags=describe.source_tags({
                                       PRIOR_RUN_TAG: run_id, describe.NOTE_TAG: note,
                                       tracking.TOKENIZER_RUN_TAG: prior.tokenizer_run_id}))
    status = "FAILED"
    try:
        tracking.log_params(eval_run, describe.run_params(
            {"prior_run_id": run_id, "heldout": str(heldout_csv), "train_csv": str(train_csv),
             "num_samples": num_samples, "draws": draws, "seed": seed, "labels": labels,
             "precision": prior.precision},
            {f"sample.{k}": v for k, v in drawn.items()}))
        _log_inputs(eval_run, heldout_input, model_id)
        dataset = heldout_input[0].dataset
        # named as the one command names them on its pipeline run
        metrics = {(k if k.startswith("ceiling/") else f"quality/{k}"): v
                   for k, v in figures.items() if isinstance(v, (int, float))}
        _log_linked(eval_run, metrics, model_id, dataset.name, dataset.digest)
        tracking.log_json(eval_run, {k: v for k, v in figures.items()}, "quality.json")
        status = "FINISHED"
    finally:
        tracking.end_run(eval_run, status)
    return eval_run, figures


def _log_inputs(run_id, datasets, model_id):
    from mlflow.entities import LoggedModelInput
    models = [LoggedModelInput(model_id)] if model_id else None
    tracking.client().log_inputs(run_id, datasets=list(datasets), models=models)


def _log_linked(run_id, metrics, model_id, dataset_name, dataset_digest):
    """Log metrics that name the held-out data set and, where there is one, the model."""
    import time
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0, model_id=model_id, dataset_name=dataset_name,
                    dataset_digest=dataset_digest) for k, v in sorted(metrics.items())]
    tracking.client().log_batch(run_id, metrics=items)


def summary_line(figures):
    mean = lambda name, digits: with_spread({f"quality/{k}": v for k, v in figures.items()},
                                            f"quality/{name}", digits)
    parts = [f"FD ratio {mean('fd_ratio', 3)}", f"precision {mean('precision', 2)}",
             f"recall {mean('recall', 2)}", f"nearest-train ratio {figures['nn_ratio']:.2f}"]
    if "confidence" in figures:
        parts.append(f"confidence {mean('confidence', 3)}")
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
    parser.add_argument("--path_to_data", required=True, help="CSV of held-out images")
    parser.add_argument("--train_csv", help="the real reference: the tokenizer's training CSV "
                                            "(default: the path its run recorded)")
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
