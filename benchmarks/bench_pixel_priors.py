"""Pixel-level GPTs on the demo digits at equal training time: bits per dimension for each
attention kind (softmax, linear, momentum) with the mixture head and with the softmax head, on
16x16 grey digits as 4-bit levels; then Image GPT's probe of one of them.

    python -m benchmarks.bench_pixel_priors            # 6 settings x 5 minutes + probe: ~45 min
                                                       # on 2 CPU cores; runs go to ./mlflow.db
    python -m benchmarks.bench_pixel_priors --minutes 1 --attention linear --heads mixture

End to end, as a user would: the demo digits (`demo_data/`), a `pixels` tokenizer (`levels`,
4 bits), one prior per setting trained for the same wall time (train.py's `--max_minutes`, the
learning-rate schedule on the clock), each scored on heldout.csv (`python -m pipeline
evaluate`), with samples and half-image completions logged to its run. The literature's basis:
every pixel value is scored (the start token lets the first one be predicted too), and nats are
divided by pixels x channels x ln 2. Checkpoints are chosen on the validation split (10% of
train.csv), never on heldout.csv. The probe (`python -m pipeline probe`) fits on train.csv and
scores heldout.csv.

Equal time means unequal steps: the table says how many each setting took. Timings on a
shared machine are noisy; so are equal-time comparisons made on one.
"""

import argparse
import sys
import time
from pathlib import Path

from pipeline import tracking
from pipeline.complete import complete
from pipeline.demo_data import write_digits
from pipeline.evaluate import evaluate
from pipeline.generate import generate
from pipeline.probe import probe
from pipeline.tokenizers import fit_tokenizer
from pipeline.train_prior import train_prior

MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 64, "dropout": 0.0, "mixtures": 10}
TRAIN = {"batch_size": 32, "learning_rate": 1e-3, "max_steps": 4000, "eval_every": 100,
         "checkpoint_every": 100_000}  # max_steps bounds the run; --max_minutes ends it


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training time per setting")
    parser.add_argument("--attention", nargs="+", default=["softmax", "linear", "momentum"])
    parser.add_argument("--heads", nargs="+", default=["mixture", "softmax"])
    parser.add_argument("--data_dir", default="demo_data")
    parser.add_argument("--out_dir", default="bench_pixel_priors")
    parser.add_argument("--experiment", default="pixel-priors")
    parser.add_argument("--probe_attention", default="linear",
                        help="probe the prior of this kind with the mixture head ('none': skip)")
    parser.add_argument("--finetune_steps", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.out_dir)
    train_csv, heldout_csv = write_digits(args.data_dir)
    tokenizer = fit_tokenizer("pixels", {"mode": "levels", "bits": 4},
                              {"path_to_data": str(train_csv), "experiment": args.experiment})
    print(f"tokenizer run {tokenizer}: 16x16 grey digits, 4-bit levels", file=sys.stderr)

    rows, priors = [], {}
    for attention in args.attention:
        for head in args.heads:
            name = f"{attention}-{head}"
            start = time.perf_counter()
            run_id = train_prior({**MODEL, "attention": attention, "head": head},
                                 {**TRAIN, "run_id": tokenizer, "max_minutes": args.minutes,
                                  "experiment": args.experiment})
            seconds = time.perf_counter() - start
            history = tracking.client().get_metric_history(run_id, "val/bits_per_dim")
            heldout = evaluate(run_id, heldout_csv, name="heldout")["bits_per_dim"]
            sample_s = generate(run_id, num_samples=32, out_dir=out / name / "samples",
                                name="bench").seconds
            complete(run_id, heldout_csv, keep="top", num_completions=4, max_images=8,
                     out_dir=out / name / "completions", name="half")
            rows.append({"setting": name, "run": run_id, "steps": history[-1].step,
                         "train_s": seconds, "val": min(m.value for m in history),
                         "heldout": heldout, "sample_s": sample_s})
            priors[(attention, head)] = run_id

    print(f"\nbits per dimension, 16x16 digits at 4-bit levels, {args.minutes:g} min of training "
          f"each ({MODEL['n_layer']} layers, d={MODEL['n_embd']}, batch {TRAIN['batch_size']})")
    header = (f"{'setting':<18} {'steps':>6} {'wall s':>7} {'val bits/dim':>13} "
              f"{'heldout bits/dim':>17} {'32 samples s':>13}  run")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['setting']:<18} {row['steps']:>6} {row['train_s']:>7.0f} {row['val']:>13.4f} "
              f"{row['heldout']:>17.4f} {row['sample_s']:>13.1f}  {row['run']}")
    print("(val: best over evaluations on the validation split, which also picks best.pt; "
          "heldout: best.pt on heldout.csv; samples and completions in each run's MLflow "
          f"artifacts and under {out}/)")

    chosen = priors.get((args.probe_attention, "mixture"))
    if chosen:
        _, summary = probe(chosen, train_csv, heldout_csv, finetune_steps=args.finetune_steps,
                           experiment=args.experiment)
        best = summary["layers"][summary["best_layer"]]
        print(f"\nprobe of {args.probe_attention}-mixture ({chosen}), held-out accuracy on "
              f"{summary['num_heldout']} digits:")
        print(f"  linear probe, layer {summary['best_layer']} (chosen on validation, val "
              f"{best['val_accuracy']:.3f}): {summary['linear_probe_heldout_accuracy']:.3f}")
        print(f"  fine-tuned ({args.finetune_steps} steps, generative loss as auxiliary): "
              f"{summary['finetune_heldout_accuracy']:.3f}")
        print(f"  logistic regression on raw pixels: "
              f"{summary['raw_pixels_heldout_accuracy']:.3f}")


if __name__ == "__main__":
    main()
