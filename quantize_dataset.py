"""Encode a CSV's images with a trained VQ-VAE and log codes/<name>.npy + .json into its run.

    python quantize_dataset.py --run_id <vqvae run> [--path_to_data CSV] [--name NAME]
"""

import argparse

from pipeline.codes import quantize
from pipeline.errors import run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", required=True, help="the VQ-VAE run")
    parser.add_argument("--path_to_data", help="CSV to encode (default: the run's training CSV)")
    parser.add_argument("--name", help="artifact name codes/<name>.npy (default: the CSV's stem)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    run_id = quantize(args.run_id, args.path_to_data, args.name, args.batch_size, args.device)
    print(f"run_id={run_id}")


if __name__ == "__main__":
    run_cli(main)
