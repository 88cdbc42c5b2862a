"""Do labels steer the convolutional priors? Each family, conditional, at its default budget on
the demo digits' 4-bit pixels, judged by the pipeline's quality figures: the table in
docs/pixelcnn.md.

    python -m experiments.label_steering                 # train.csv against heldout.csv
    python -m experiments.label_steering --validation    # the first 1,300 rows of train.csv
                                                         # against its last 200: choose here
    python -m experiments.label_steering --families gated_pixelcnn --label_maps 0

As a user would: the demo digits (`demo_data/`), a `pixels` tokenizer in `levels` mode with 4
bits (the small preset's), then per family `python train.py --prior NAME --run_id <tokenizer>
--conditional` (its TRAIN_DEFAULTS: batch 16, 700-1500 steps), then `python -m pipeline quality
--run_id <prior> --path_to_data <held-out CSV> --labels all` without guidance and with
`--sample.guidance 2`. `label_agreement` is the share of samples that the judge's classifier
(a small CNN trained on the tokenizer's training images) reads as the class asked for.

Before the table, each family's label terms: for every layer, the part of its label term that
changes with the class (RMS over classes, channels and positions, on held-out grids) over the
RMS of the pre-activation it is added to. A layer the label barely reaches reads near 0.
Runs go to the MLflow store of the working directory (./mlflow.db unless MLFLOW_TRACKING_URI
says otherwise).
"""

import argparse
import statistics
import sys
import time

import torch

from pipeline import tracking
from pipeline.codes import load_run_codes
from pipeline.demo_data import write_digits
from pipeline.device import pick_device
from pipeline.generate import LoadedPrior
from pipeline.quality_run import judge
from pipeline.tokenizers import fit_tokenizer, quantize
from pipeline.train_prior import train_prior
from pixelcnn.layers import LabelBias

FAMILIES = ["pixelcnn", "gated_pixelcnn", "pixelcnnpp", "pixelsnail"]
PIXELS = {"image_size": 16, "mode": "levels", "bits": 4}  # pipeline/run.py's small preset
FIT_ROWS = 1300  # --validation: train on these rows of train.csv, judge on the rest


def validation_split(data_dir):
    """(fit.csv, val.csv): the first FIT_ROWS rows of train.csv and the rest, beside it."""
    lines = (data_dir / "train.csv").read_text().splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    (data_dir / "fit.csv").write_text(header + "".join(rows[:FIT_ROWS]))
    (data_dir / "val.csv").write_text(header + "".join(rows[FIT_ROWS:]))
    return data_dir / "fit.csv", data_dir / "val.csv"


@torch.no_grad()
def label_term_ratios(model, tokens, num_classes):
    """{layer: RMS of its label term's class-dependent part / RMS of its pre-activation}, over
    `tokens` (N, h, w) given each class in turn."""
    seen = {}
    layers = {m: name for name, m in model.named_modules() if isinstance(m, LabelBias)}
    record = lambda m, args, out: seen.setdefault(layers[m], []).append((out, args[1]))
    hooks = [m.register_forward_hook(record) for m in layers]
    for c in range(num_classes):
        model(tokens, torch.full((len(tokens),), c))
    for hook in hooks:
        hook.remove()
    rms = lambda x: x.pow(2).mean().sqrt().item()
    ratios = {}
    for name, runs in seen.items():
        # (classes, N, C, h, w); the gated stack's term covers both stacks, `pre` the vertical
        terms = torch.stack([term.expand(-1, -1, *pre.shape[2:]) for term, pre in runs])
        pre = statistics.mean(rms(p) for _, p in runs)
        ratios[name] = rms(terms - terms.mean(0)) / pre
    return ratios


def last_metric(run_id, name):
    history = tracking.client().get_metric_history(run_id, name)
    return max(history, key=lambda m: m.step).value if history else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--validation", action="store_true",
                        help=f"train on the first {FIT_ROWS} rows of train.csv and judge on the "
                             f"rest (where settings may be chosen), not on heldout.csv")
    parser.add_argument("--label_maps", type=int,
                        help="the priors' --label_maps (default: the family's)")
    parser.add_argument("--max_steps", type=int, help="default: the family's TRAIN_DEFAULTS")
    parser.add_argument("--num_samples", type=int, default=100, help="per draw, classes in turn")
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="demo_data")
    parser.add_argument("--experiment", default="label-steering")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_csv, heldout_csv = write_digits(args.data_dir)
    if args.validation:
        train_csv, heldout_csv = validation_split(train_csv.parent)
    tokenizer = fit_tokenizer("pixels", PIXELS, {"path_to_data": str(train_csv),
                                                 "seed": args.seed,
                                                 "experiment": args.experiment})
    quantize(tokenizer, str(heldout_csv), name="judged", progress=False)
    judged, _ = load_run_codes(tokenizer, "judged")
    model_flags = {} if args.label_maps is None else {"label_maps": args.label_maps}
    budget = {} if args.max_steps is None else {"max_steps": args.max_steps}

    rows = []
    for family in args.families:
        start = time.perf_counter()
        run_id = train_prior(model_flags, {"prior": family, "run_id": tokenizer,
                                           "codes": train_csv.stem, "conditional": True,
                                           "seed": args.seed, "experiment": args.experiment,
                                           "log_model": False, **budget})
        seconds = time.perf_counter() - start
        prior = LoadedPrior(run_id, pick_device(None))
        ratios = label_term_ratios(prior.model, judged[:64], len(prior.classes))
        print(f"{family}: label term / pre-activation per layer: "
              + " ".join(f"{r:.2f}" for r in ratios.values()), file=sys.stderr)
        figures = {g: judge(run_id, str(heldout_csv), args.num_samples, args.draws, args.seed,
                            {"guidance": g}, experiment=args.experiment)[1] for g in (1.0, 2.0)}
        steps = int(tracking.client().get_run(run_id).data.params["max_steps"])
        guided = figures[2.0]
        rows.append(f"{family:<15} {steps:>5} {last_metric(run_id, 'val/bits_per_dim'):>12.3f} "
                    f"{figures[1.0]['label_agreement']:>15.2f} "
                    f"{guided['label_agreement']:>14.2f} {guided['classifier_confidence']:>10.2f} "
                    f"{figures[1.0]['fd_ratio']:>15.2f} / {guided['fd_ratio']:<5.2f} "
                    f"{seconds:>7.0f} "
                    f"{min(ratios.values()):>11.2f}-{max(ratios.values()):<11.2f}  {run_id}")
        print(rows[-1], file=sys.stderr)

    print(f"\ntokenizer run {tokenizer} (pixels, levels, 4 bits) fitted on {train_csv}; judged "
          f"on {heldout_csv} ({len(judged)} images), {args.draws} draws of {args.num_samples} "
          f"samples, classes in turn")
    header = (f"{'family':<15} {'steps':>5} {'val bits/dim':>12} {'agree, no guid.':>15} "
              f"{'agree, guid. 2':>14} {'confidence':>10} {'FD ratio, no guid. / 2':>23} "
              f"{'train s':>7} "
              f"{'label/pre-act (min-max)':>23}  run")
    print(header + "\n" + "-" * len(header))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
