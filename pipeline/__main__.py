"""The whole chain in one command.

    python -m pipeline demo                       # real handwritten digits, no network
    python -m pipeline --path_to_data train.csv --out_dir out --preset small
    python -m pipeline --path_to_data train.csv --out_dir out --vqvae.max_steps 2000 --prior.n_layer 6

Stage flags take the stage's name as a prefix: --vqvae.<flag> (train_vqvae.py's flags),
--prior.<flag> (train.py's) and --sample.<flag> (transformer_generation.py's).
"""

import argparse
import shlex
import sys
from pathlib import Path

from pipeline.config import add_flags, given
from pipeline.errors import run_cli


def sample_flags(parser):
    group = parser.add_argument_group("sampling (--sample.<flag>)")
    for flag, kind in (("num_samples", int), ("batch_size", int), ("temperature", float),
                       ("top_k", int), ("top_p", float)):
        group.add_argument(f"--sample.{flag}", type=kind, default=argparse.SUPPRESS)


def main(argv=None):
    from transformer.model import GPTConfig
    from transformer.train import TrainConfig as PriorTrainConfig
    from vqvae.model import VQVAEConfig
    from vqvae.train import TrainConfig as VQTrainConfig
    from pipeline.run import PRESETS, run_pipeline
    argv = sys.argv[1:] if argv is None else argv
    demo = bool(argv) and argv[0] == "demo"
    parser = argparse.ArgumentParser(prog="python -m pipeline" + (" demo" if demo else ""),
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if demo:
        parser.add_argument("--data_dir", default="demo_data", help="where the digits are written")
        parser.add_argument("--out_dir", default="demo_out")
    else:
        parser.add_argument("--path_to_data", required=True, help="CSV with an image_path column")
        parser.add_argument("--out_dir", required=True)
        parser.add_argument("--heldout", help="CSV of held-out images to judge samples against "
                                              "(default: the VQ-VAE's validation split)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME)")
    vq = parser.add_argument_group("VQ-VAE stage (--vqvae.<flag>)")
    add_flags(vq, VQTrainConfig, skip=("path_to_data", "experiment", "seed"), prefix="vqvae.")
    add_flags(vq, VQVAEConfig, skip=("in_channels",), prefix="vqvae.")
    prior = parser.add_argument_group("prior stage (--prior.<flag>)")
    add_flags(prior, PriorTrainConfig, skip=("run_id", "codes", "path_to_data", "codebook_size",
                                             "experiment", "seed"), prefix="prior.")
    add_flags(prior, GPTConfig, skip=("vocab_size", "grid_h", "grid_w"), prefix="prior.")
    sample_flags(parser)
    args = parser.parse_args(argv[1:] if demo else argv)

    overrides = {"vqvae": {**given(args, VQTrainConfig, "vqvae."), **given(args, VQVAEConfig, "vqvae.")},
                 "prior": {**given(args, PriorTrainConfig, "prior."), **given(args, GPTConfig, "prior.")},
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
                           heldout, args.seed, data_name="digits" if demo else None,
                           command=shlex.join(["python", "-m", "pipeline", *argv]))
    report(summary)
    print(f"run_id={summary['pipeline_run_id']}")


def report(summary):
    m, t = summary["metrics"], summary["timings"]
    prior_val = ", ".join(f"{k[len('prior/'):]} {v:.3f}" for k, v in sorted(m.items())
                          if k.startswith("prior/val/"))
    lines = [
        f"samples: {summary['samples_dir']}/ ({int(m.get('quality/num_samples', 0))} PNGs), "
        f"grid: {summary['grid']}",
        f"VQ-VAE {summary['vqvae_run_id']} ({summary['stages']['vqvae']}): "
        f"val/psnr_db {m.get('vqvae/val/psnr_db', float('nan')):.2f}, "
        f"val/codebook_usage {m.get('vqvae/val/codebook_usage', float('nan')):.3f}",
        f"prior {summary['prior_run_id']} ({summary['stages']['prior']}): {prior_val}",
        f"quality vs held-out: FD ratio {m['quality/fd_ratio']:.2f} (1 = as close as real "
        f"images), nearest-train ratio {m['quality/nn_ratio']:.2f} (<<1 = copies), "
        f"copy fraction {m['quality/copy_fraction']:.3f}",
    ]
    if "quality/classes_present" in m:
        lines.append(f"classes present {int(m['quality/classes_present'])}/"
                     f"{int(m['quality/num_classes'])}, classifier confidence "
                     f"{m['quality/classifier_confidence']:.2f}")
    lines.append(f"time: total {t['total_s']:.0f} s (vqvae {t['vqvae_s']:.0f}, prior "
                 f"{t['prior_s']:.0f}, generate {t['generate_s']:.1f}, quality {t['quality_s']:.1f})")
    lines.append(f"summary: {Path(summary['samples_dir']).parent / 'summary.json'}; browse the "
                 f"runs with `mlflow ui` (tracking store {summary['tracking_uri']}), then open "
                 f"http://127.0.0.1:5000/#/experiments/{summary['experiment_id']}/runs"
                 f"?workflowType=machine_learning (the Model training view)")
    print("\n".join(lines), file=sys.stderr)

if __name__ == "__main__":
    run_cli(main)
