"""The whole chain in one command.

    python -m pipeline demo                       # real handwritten digits, no network
    python -m pipeline --path_to_data train.csv --out_dir out --preset small
    python -m pipeline --path_to_data train.csv --out_dir out --vqvae.max_steps 2000 --prior.n_layer 6
    python -m pipeline --path_to_data train.csv --out_dir out --tokenizer pixels --tokenizer.bits 2
    python -m pipeline evaluate --run_id <prior run> --path_to_data heldout.csv
    python -m pipeline probe --run_id <prior run> --path_to_data train.csv --heldout heldout.csv
    python -m pipeline classify --model models:/NAME/VERSION --path_to_data images.csv
    python -m pipeline import --format mnist --root ~/torchvision_data --out mnist
    python -m pipeline quality --run_id <prior run> --path_to_data heldout.csv

Stage flags take the stage's name as a prefix: --tokenizer.<flag> (the tokenizer kind's flags:
train_vqvae.py's for --tokenizer vqvae, the default; also spelt --vqvae.<flag>), --prior.<flag>
(train.py's) and --sample.<flag> (transformer_generation.py's).
"""

import argparse
import shlex
import sys
from pathlib import Path

import image_tokenizers
import priors
from core.config import add_flags, given
from core.errors import UserError
from pipeline.cli import run_cli
from pipeline.device import PRECISION_HELP, PRECISIONS
from pipeline.generate import GenerationConfig
from pipeline.run import NOT_IN_PIPELINE, PRESETS, run_pipeline, tokenizer_trainer
from pipeline.tracking import resolve_run_id
from pipeline.train_prior import TrainConfig as PriorTrainConfig
from priors.base import DATA_FIELDS


def sample_flags(parser, family_name):
    """--sample.<flag>: the generation's settings (transformer_generation.py's, less --seed,
    which is the pipeline's own) and those of the prior family's sampling dataclass, less the
    ones the pipeline cannot judge (pipeline.run.NOT_IN_PIPELINE)."""
    group = parser.add_argument_group("sampling (--sample.<flag>, transformer_generation.py's)")
    add_flags(group, GenerationConfig, skip=("seed",), prefix="sample.")
    add_flags(group, priors.sampling_class(family_name), skip=NOT_IN_PIPELINE, prefix="sample.")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    demo = bool(argv) and argv[0] == "demo"
    # the family's own flags depend on --prior.prior, or else the preset's family
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="small")
    first.add_argument("--prior.prior", dest="family")
    first.add_argument("--tokenizer", default="vqvae")
    known = first.parse_known_args(argv)[0]
    kind = image_tokenizers.kind(known.tokenizer)
    tokenizer_train, _ = tokenizer_trainer(known.tokenizer)
    family = priors.family(known.family or PRESETS.get(known.preset, {}).get("prior", {})
                           .get("prior", "gpt"))
    parser = argparse.ArgumentParser(prog="python -m pipeline" + (" demo" if demo else ""),
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if demo:
        parser.add_argument("--data_dir", default="demo_data", help="where the digits are written")
        parser.add_argument("--out_dir", default="demo_out")
    else:
        parser.add_argument("--path_to_data", required=True,
                            help="CSV with an image_path column (and optionally label), or a "
                                 "folder of images (class subfolders label them)")
        parser.add_argument("--out_dir", required=True)
        parser.add_argument("--heldout", help="CSV or folder of held-out images to judge "
                                              "samples against (default: the tokenizer's "
                                              "validation split)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--register", default="demo-digits" if demo else None,
                        help="register the prior's MLflow Model under this name, ready for "
                             "`mlflow models serve`: alias @champion when its held-out FD "
                             "ratio beats the champion's, else @challenger"
                             + (" (default: demo-digits)" if demo else ""))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help=PRECISION_HELP + ": every stage, each recording what it ran in")
    parser.add_argument("--quality_draws", type=int, default=8,
                        help="average the quality figures over this many draws of the samples' "
                             "size (the first is the saved samples); one draw's figures move "
                             "with the seed")
    parser.add_argument("--minutes", type=float,
                        help="a time budget for the whole command: the training stages get "
                             "shares of it (--max_minutes) and their learning-rate schedules "
                             "follow it; the preset's step counts stay the cap "
                             "(pipeline/budget.py)")
    parser.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME)")
    parser.add_argument("--system_metrics", action="store_true",
                        help="log the machine's CPU, memory (and GPU) use to the training runs "
                             "as system/... (needs psutil)")
    parser.add_argument("--tokenizer", default="vqvae", choices=sorted(image_tokenizers.KINDS),
                        help="the tokenizer kind; its flags are --tokenizer.<flag>")
    # the kind's flags, as --tokenizer.<flag> and as --<kind>.<flag> (e.g. --vqvae.max_steps)
    group = parser.add_argument_group(f"{known.tokenizer} tokenizer stage (--tokenizer.<flag>, "
                                      f"also spelt --{known.tokenizer}.<flag>)")
    for prefix, hidden in (("tokenizer.", False), (f"{known.tokenizer}.", True)):
        add_flags(group, tokenizer_train, skip=("path_to_data", "experiment", "seed",
                                                "precision", "system_metrics"),
                  prefix=prefix, hidden=hidden)
        add_flags(group, kind.Config, skip=("in_channels",), prefix=prefix, hidden=hidden)
    prior = parser.add_argument_group("prior stage (--prior.<flag>)")
    # the prior holds out the tokenizer's validation rows (--tokenizer.val_fraction)
    add_flags(prior, PriorTrainConfig, skip=("run_id", "codes", "path_to_data", "codebook_size",
                                             "experiment", "seed", "split_seed", "register",
                                             "precision", "val_fraction", "system_metrics"),
              prefix="prior.")
    add_flags(prior, family.Config, skip=DATA_FIELDS, prefix="prior.")
    sample_flags(parser, family.Model.family)
    args = parser.parse_args(argv[1:] if demo else argv)

    tokenizer_flags = {}
    for prefix in (f"{known.tokenizer}.", "tokenizer."):  # --tokenizer.<flag> wins
        tokenizer_flags.update({**given(args, tokenizer_train, prefix),
                                **given(args, kind.Config, prefix)})
    overrides = {"tokenizer": tokenizer_flags,
                 "prior": {**given(args, PriorTrainConfig, "prior."),
                           **given(args, family.Config, "prior.")},
                 "sample": {k.split(".", 1)[1]: v for k, v in vars(args).items()
                            if k.startswith("sample.")}}
    heldout = getattr(args, "heldout", None)
    if demo:
        from pipeline.demo_data import write_digits
        path_to_data, heldout = write_digits(args.data_dir)
        print(f"demo data: {path_to_data} (1,500 digits) and {heldout} (297 held out), "
              f"from scikit-learn's bundled copy of the UCI handwritten digits", file=sys.stderr)
    else:
        path_to_data = args.path_to_data
    summary = run_pipeline(path_to_data, args.out_dir, args.preset, overrides, args.experiment,
                           heldout, args.seed, args.register,
                           data_name="digits" if demo else None,
                           command=shlex.join(["python", "-m", "pipeline", *argv]),
                           quality_draws=args.quality_draws, tokenizer=args.tokenizer,
                           precision=args.precision, minutes=args.minutes,
                           system_metrics=args.system_metrics)
    report(summary)
    print(f"run_id={summary['pipeline_run_id']}")


def evaluate_command(argv):
    """python -m pipeline evaluate --run_id <prior> --path_to_data heldout.csv"""
    from pipeline.evaluate import evaluate
    parser = argparse.ArgumentParser(prog="python -m pipeline evaluate",
                                     description="Held-out likelihood of a prior run, in bits "
                                                 "per image dimension; logged to the run.")
    parser.add_argument("--run_id", required=True,
                        help="the prior run (or models:/NAME/VERSION, models:/NAME@alias)")
    parser.add_argument("--path_to_data", required=True, help="CSV or folder of images to "
                                                              "score")
    parser.add_argument("--name", help="metric/artifact name (default: the CSV's stem)")
    parser.add_argument("--elbo_samples", type=int, default=8,
                        help="Monte-Carlo draws per image for priors whose nll is a bound")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    args = parser.parse_args(argv)
    args.run_id = resolve_run_id(args.run_id)  # a models:/ URI names its run
    evaluate(args.run_id, args.path_to_data, args.name, args.elbo_samples, args.batch_size,
             args.seed, args.device, args.precision)
    print(f"run_id={args.run_id}")


def probe_command(argv):
    """python -m pipeline probe --run_id <prior> --path_to_data labelled.csv [--heldout CSV]"""
    from pipeline.probe import probe
    parser = argparse.ArgumentParser(
        prog="python -m pipeline probe",
        description="Image GPT's probes: a logistic regression on each layer's average-pooled "
                    "features (the layer chosen on validation), optionally fine-tuning with "
                    "the generative loss as an auxiliary term, next to a logistic regression "
                    "on raw pixels; held-out accuracies logged to a new `probe` run.")
    parser.add_argument("--run_id", required=True,
                        help="the prior run (a family with per-layer features: gpt, absorbing)")
    parser.add_argument("--path_to_data", required=True,
                        help="labelled CSV (image_path,label) or folder (class subfolders) "
                             "to fit and validate on")
    parser.add_argument("--heldout", help="labelled CSV or folder to score on (default: a "
                                          "held-out split of --path_to_data)")
    parser.add_argument("--val_fraction", type=float, default=0.15,
                        help="share of the fitting images used to choose layer, C and step")
    parser.add_argument("--heldout_fraction", type=float, default=0.2,
                        help="without --heldout: share of the CSV held out")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune the prior with a classification head")
    parser.add_argument("--finetune_steps", type=int, default=300)
    parser.add_argument("--finetune_lr", type=float, default=1e-3)
    parser.add_argument("--aux_weight", type=float, default=1.0,
                        help="weight of the generative loss while fine-tuning")
    parser.add_argument("--batch_size", type=int, default=32, help="fine-tuning batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device")
    parser.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME)")
    parser.add_argument("--register", metavar="NAME",
                        help="with --finetune: register the classifier's MLflow Model under "
                             "this name (alias @champion), for `python -m pipeline classify`")
    args = parser.parse_args(argv)
    if args.finetune and args.finetune_steps < 1:
        raise UserError(f"--finetune_steps must be at least 1, got {args.finetune_steps}")
    run_id, _ = probe(args.run_id, args.path_to_data, args.heldout, args.val_fraction,
                      args.heldout_fraction, args.finetune_steps if args.finetune else None,
                      args.finetune_lr, args.aux_weight, args.batch_size, args.seed, args.device,
                      args.experiment, args.register)
    print(f"run_id={run_id}")


def classify_command(argv):
    """python -m pipeline classify --model models:/NAME/VERSION --path_to_data images.csv"""
    from pipeline.classify import classify
    parser = argparse.ArgumentParser(
        prog="python -m pipeline classify",
        description="Classify a CSV's images with the classifier `probe --finetune` logged; "
                    "write the predictions, and print the accuracy when the CSV has labels.")
    parser.add_argument("--model", required=True,
                        help="models:/NAME/VERSION, models:/NAME@alias, models:/<model id> or "
                             "the probe run's id")
    parser.add_argument("--path_to_data", required=True,
                        help="CSV with an image_path column (and optionally label), or a "
                             "folder of images (class subfolders label them)")
    parser.add_argument("--out", default="predictions.csv",
                        help="the predictions CSV: image_path, label, predicted, a probability "
                             "column per class")
    args = parser.parse_args(argv)
    _, accuracy = classify(args.model, args.path_to_data, args.out)
    print(f"predictions={args.out}")
    if accuracy is not None:
        print(f"accuracy={accuracy:.6f}")


def import_command(argv):
    """python -m pipeline import --format mnist|fashion_mnist|cifar10 --root DIR --out DIR"""
    from pipeline.importer import main
    main(argv)


def quality_command(argv):
    """python -m pipeline quality --run_id <prior> --path_to_data heldout.csv"""
    from pipeline.quality_run import main
    main(argv)


COMMANDS = {"evaluate": evaluate_command, "probe": probe_command, "classify": classify_command,
            "import": import_command, "quality": quality_command}


def versus_real(metrics, name):
    """'real 0.911: 0.899x', the real reference's figure and the samples' share of it (three
    digits: two would print 0.899, short of a 0.9x target, as 0.90x)."""
    real = metrics[f"quality/real_{name}"]
    return f"real {real:.3f}: {metrics[f'quality/{name}'] / max(real, 1e-12):.3f}x"


def report(summary):
    from pipeline.quality import with_spread
    m, t = summary["metrics"], summary["timings"]
    mean = lambda name, digits: with_spread(m, f"quality/{name}", digits)
    count = int(m.get("quality/draws", 1))
    draws = (f"; mean ± sd over {count} draws of {int(m['quality/num_samples'])}"
             if count > 1 else "")
    prior_val = ", ".join(f"{k[len('prior/'):]} {v:.3f}" for k, v in sorted(m.items())
                          if k.startswith("prior/val/"))
    lines = [
        f"samples: {summary['samples_dir']}/ ({int(m.get('quality/num_samples', 0))} PNGs), "
        f"grid: {summary['grid']}",
        f"tokenizer {summary['tokenizer']} {summary['tokenizer_run_id']} "
        f"({summary['stages']['tokenizer']})" + "".join(
            f", {k[len('tokenizer/'):]} {v:.3f}" for k, v in sorted(m.items())
            if k.startswith("tokenizer/val/") and k.endswith(("psnr_db", "codebook_usage"))),
        f"prior {summary['prior_run_id']} ({summary['stages']['prior']}): {prior_val}",
        f"quality vs held-out ({summary.get('feature_space', 'random')} features; "
        f"{'tone-matched samples; ' if summary.get('tone_matched') else ''}real "
        f"training images score FD ratio 1{draws}): FD ratio {mean('fd_ratio', 3)}, "
        f"precision {mean('precision', 2)} ({versus_real(m, 'precision')}), "
        f"recall {mean('recall', 2)} ({versus_real(m, 'recall')}), "
        f"nearest-train ratio {m['quality/nn_ratio']:.2f} (<<1 = copies), copy fraction "
        f"{m['quality/copy_fraction']:.3f}",
    ]
    if "quality/classes_present" in m:
        accuracy = m.get("quality/classifier_heldout_accuracy")
        held_out = (f"; the classifier's held-out accuracy {accuracy:.3f}"
                    if accuracy is not None else "")
        agreement = (f", drawn class recognised in {mean('label_agreement', 3)}"
                     if "quality/label_agreement" in m else "")
        lines.append(f"classes present {m['quality/classes_present']:g}/"
                     f"{int(m['quality/num_classes'])}, classifier confidence "
                     f"{mean('classifier_confidence', 3)} (real training images "
                     f"{m['quality/real_classifier_confidence']:.3f}{held_out}){agreement}")
    if "ceiling/fd_ratio" in m:
        lines.append(
            f"tokenizer ceiling (a perfect prior: the tokenizer's reconstructions of training images; "
            f"PSNR on held-out): PSNR {m['ceiling/psnr']:.1f} dB, FD ratio "
            f"{m['ceiling/fd_ratio']:.2f}, precision {m['ceiling/precision']:.2f}, recall "
            f"{m['ceiling/recall']:.2f}" + (
                f", classifier confidence {m['ceiling/classifier_confidence']:.2f}"
                if "ceiling/classifier_confidence" in m else ""))
    lines.append(f"time: total {t['total_s']:.0f} s in {summary.get('precision', 'fp32')} "
                 f"(tokenizer {t['tokenizer_s']:.0f}, prior "
                 f"{t['prior_s']:.0f}, generate {t['generate_s']:.1f}, ceiling "
                 f"{t.get('ceiling_s', 0):.1f}, quality {t['quality_s']:.1f})"
                 + (f" of a --minutes {summary['minutes']:g} budget "
                    f"({60 * summary['minutes']:.0f} s)" if summary.get("minutes") else ""))
    if summary.get("registered_model"):
        lines.append(f"model: {summary['registered_model']} (alias "
                     f"@{summary['registered_alias']}); serve it with "
                     f"`mlflow models serve -m {summary['registered_model']} --env-manager local`")
    lines.append(f"summary: {Path(summary['samples_dir']).parent / 'summary.json'}; browse the "
                 f"runs with `mlflow ui` (tracking store {summary['tracking_uri']}), then open "
                 f"http://127.0.0.1:5000/#/experiments/{summary['experiment_id']}/runs"
                 f"?workflowType=machine_learning (the Model training view)")
    print("\n".join(lines), file=sys.stderr)

if __name__ == "__main__":
    run_cli(main)
