"""Decode token grids to PNGs with a tokenizer run (VQ-VAE or pixels).

    python images_from_indexes.py --run_id <prior run> [--indexes NAME] --out_dir DIR
    python images_from_indexes.py --tokenizer_run_id <tokenizer run> --indexes_path codes.npy --out_dir DIR
"""

import argparse

from pipeline.cli import run_cli
from pipeline.generate import images_from_indexes
from pipeline.tracking import resolve_run_id


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", help="a prior run: decode its generated/<indexes>.npy")
    parser.add_argument("--indexes", help="which generated/<name>.npy (default: the latest)")
    parser.add_argument("--tokenizer_run_id", "--vqvae_run_id", dest="tokenizer_run_id",
                        help="the tokenizer that decodes (default: the prior's lineage tag)")
    parser.add_argument("--indexes_path", help="a local (N, h, w) .npy of token indices")
    parser.add_argument("--out_dir", help="write the PNGs and grid.png here")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    args.run_id = resolve_run_id(args.run_id)  # a models:/ URI names its run
    args.tokenizer_run_id = resolve_run_id(args.tokenizer_run_id, "--tokenizer_run_id")
    images_from_indexes(args.run_id, args.indexes, args.tokenizer_run_id, args.indexes_path,
                        args.out_dir, args.device)
    print(f"run_id={args.run_id or args.tokenizer_run_id}")


if __name__ == "__main__":
    run_cli(main)
