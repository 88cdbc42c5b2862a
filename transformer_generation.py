"""Sample code grids from a trained prior (batched, KV-cached) and decode them to images.

    python transformer_generation.py --run_id <prior run> --num_samples 64 --out_dir samples/
"""

import argparse

from pipeline.errors import run_cli
from pipeline.generate import generate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", required=True, help="the prior (transformer) run")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, help="grids sampled at once (default: all)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, help="sample among the k likeliest codes")
    parser.add_argument("--top_p", type=float, help="nucleus sampling mass, in (0, 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="artifact name generated/<name>.npy (default: timestamp)")
    parser.add_argument("--out_dir", help="also write the decoded PNGs here")
    parser.add_argument("--no_decode", action="store_true", help="only sample and log the codes")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    generate(args.run_id, args.num_samples, args.batch_size, args.temperature, args.top_k,
             args.top_p, args.seed, args.out_dir, args.no_decode, args.name, args.device)
    print(f"run_id={args.run_id}")


if __name__ == "__main__":
    run_cli(main)
