"""Validation bits/dim of every attention kind of the GPT and the momentum family's options, on
the same tokens with the same seed and budget: the table in docs/gpt.md.

    python -m experiments.attention_kinds                    # the demo digits, the demo's VQ-VAE
                                                             # (trained here), then every setting
    python -m experiments.attention_kinds --run_id <tokenizer> --settings softmax momentum
    python -m experiments.attention_kinds --max_steps 2400 --dropout 0.3   # the demo's own budget

As a user would: the demo digits (`demo_data/`), the demo's VQ-VAE (`python -m pipeline demo`'s
tokenizer: 16x16 images, 4x4 grids of K=64 codes, 2,400 steps) and its codes, then one prior per
setting, `python train.py --run_id <tokenizer> <the setting's flags> <SHARED>`. The momentum
family's rows take the seed's MNIST settings (the Momentum Transformer's image-generation
README): momentum attention --mu 0.6 --stepsize 0.9; the momentum residual --res_mu 0.1
--res_stepsize 0.99; the adaptive residual --adaptive_type nc --res_stepsize 0.99; adaptive
momentum attention --stepsize 0.9 --delta 0.0001. Bits/dim are per image dimension (16x16
pixels), the best over the evaluations on the validation split (10% of train.csv, the rows the
tokenizer held out too), which is also the checkpoint best.pt keeps. Runs go to the MLflow
store of the working directory (./mlflow.db unless MLFLOW_TRACKING_URI says otherwise).
"""

import argparse
import sys
import time

import torch

from pipeline import tracking
from pipeline.demo_data import write_digits
from pipeline.tokenizers import quantize
from pipeline.train_prior import train_prior
from pipeline.train_tokenizer import train_vqvae

# the demo's tokenizer (pipeline/run.py's "small" preset)
VQVAE = {"image_size": 16, "channels": 64, "downsample": 4, "codebook_size": 64}
VQVAE_TRAIN = {"batch_size": 64, "max_steps": 2400, "learning_rate": 1e-3, "eval_every": 400,
               "checkpoint_every": 100_000}
# the demo's prior, unconditional, with a shorter default budget (--max_steps, --dropout)
MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128}
TRAIN = {"batch_size": 64, "learning_rate": 6e-4, "weight_decay": 0.1, "eval_every": 100,
         "checkpoint_every": 100_000, "log_model": False}
SETTINGS = {
    "softmax": {"attention": "softmax"},
    "linear": {"attention": "linear"},
    "momentum": {"attention": "momentum", "mu": 0.6, "stepsize": 0.9},
    "momentum + res": {"attention": "momentum", "mu": 0.6, "stepsize": 0.9, "res_mu": 0.1,
                       "res_stepsize": 0.99},
    "momentum + adaptive res": {"attention": "momentum", "mu": 0.6, "stepsize": 0.9,
                                "adaptive_type": "nc", "res_stepsize": 0.99},
    "adaptive_momentum": {"attention": "adaptive_momentum", "stepsize": 0.9, "delta": 1e-4},
    "softmax + res": {"attention": "softmax", "res_mu": 0.1, "res_stepsize": 0.99},
    "momentum + res + is_resw": {"attention": "momentum", "mu": 0.6, "stepsize": 0.9,
                                 "res_mu": 0.1, "res_stepsize": 0.99, "is_resw": True},
}


def flags(settings):
    return " ".join(f"--{k}" if v is True else f"--no-{k}" if v is False
                    else f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}"
                    for k, v in settings.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", help="a tokenizer run with codes (default: train the demo's)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        metavar="NAME", help=f"rows of the table: {', '.join(SETTINGS)}")
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="demo_data")
    parser.add_argument("--experiment", default="attention-kinds")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's choice; on a machine that other "
                             "jobs load, 1 can be many times faster)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = args.run_id
    if tokenizer is None:
        train_csv, _ = write_digits(args.data_dir)
        start = time.perf_counter()
        tokenizer = train_vqvae(VQVAE, {**VQVAE_TRAIN, "path_to_data": str(train_csv),
                                        "seed": args.seed, "experiment": args.experiment})
        quantize(tokenizer)
        print(f"tokenizer run {tokenizer} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    shared = {**MODEL, "dropout": args.dropout}
    train = {**TRAIN, "max_steps": args.max_steps, "seed": args.seed, "run_id": tokenizer,
             "experiment": args.experiment}

    rows = []
    for name in args.settings:
        start = time.perf_counter()
        run_id = train_prior({**shared, **SETTINGS[name]}, train)
        seconds = time.perf_counter() - start
        history = tracking.client().get_metric_history(run_id, "val/bits_per_dim")
        best = min(history, key=lambda m: m.value)
        rows.append((name, best.value, best.step, history[-1].value, seconds, run_id))
        print(f"{name}: {best.value:.4f} bits/dim at step {best.step} ({seconds:.0f} s)",
              file=sys.stderr)

    print(f"\nvalidation bits/dim on tokenizer run {tokenizer}'s codes; every setting: "
          f"{flags({**shared, **train, 'run_id': tokenizer})}")
    header = (f"{'setting':<26} {'best val bits/dim':>17} {'at step':>8} {'last':>8} "
              f"{'train s':>8}  flags")
    print(header + "\n" + "-" * len(header))
    for name, best, step, last, seconds, run_id in rows:
        print(f"{name:<26} {best:>17.4f} {step:>8} {last:>8.4f} {seconds:>8.0f}  "
              f"{flags(SETTINGS[name])}  (run {run_id})")


if __name__ == "__main__":
    main()
