"""Sample token grids from a trained prior (any family) and decode them to images; or complete
real images from a kept region.

    python transformer_generation.py --run_id <prior run> --num_samples 64 --out_dir samples/
    python transformer_generation.py --run_id <prior run> --labels 3,3,7 --guidance 3
    python transformer_generation.py --run_id <prior run> --labels all --num_samples 40
    python transformer_generation.py --run_id <prior run> --complete heldout.csv --keep top \\
        --num_completions 4 --out_dir completions/
    python transformer_generation.py --run_id <prior run> --complete heldout.csv --index 0-3,15
    python transformer_generation.py --run_id <prior run> --num_samples 16 --gif --out_dir s/
"""

import argparse

import priors
from core.config import add_flags, given
from pipeline.cli import run_cli
from pipeline.device import PRECISION_HELP, PRECISIONS
from pipeline.generate import GenerationConfig, generate
from pipeline.tracking import resolve_run_id


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", required=True,
                        help="the prior run (or models:/NAME/VERSION, models:/NAME@alias)")
    add_flags(parser, GenerationConfig)
    # the family is known once the run is loaded: every family's settings are flags here, and
    # the run's family refuses the ones it does not take (priors/settings.py)
    sampling = priors.all_sampling()
    add_flags(parser.add_argument_group("sampling (the prior family's settings)"), sampling)
    completion = parser.add_argument_group("completion")
    completion.add_argument("--complete", metavar="CSV", help="complete these images (a CSV or "
                                                               "a folder) instead of sampling "
                                                               "from scratch")
    completion.add_argument("--keep", default="top", help="top, left, center or random:P")
    completion.add_argument("--offset", type=int, help="keep the first N tokens (overrides --keep)")
    completion.add_argument("--num_completions", type=int, default=4)
    completion.add_argument("--max_images", type=int, default=8,
                            help="complete the CSV's first N images")
    completion.add_argument("--index", help="complete these rows of the CSV instead, counted "
                                            "from 0 (the first under the header): rows and "
                                            "inclusive ranges, e.g. 0-10,15")
    completion.add_argument("--random", type=int, metavar="N",
                            help="complete N rows of the CSV drawn with --seed instead")
    parser.add_argument("--name", help="artifact name generated/<name>.npy (default: timestamp)")
    parser.add_argument("--out_dir", help="also write the decoded PNGs here")
    parser.add_argument("--no_decode", action="store_true", help="only sample and log the codes")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    args = parser.parse_args(argv)
    args.run_id = resolve_run_id(args.run_id)  # a models:/ URI names its run
    generation, settings = given(args, GenerationConfig), given(args, sampling)  # the flags given
    output = dict(out_dir=args.out_dir, name=args.name, device=args.device,
                  precision=args.precision)
    if args.complete:
        from pipeline.complete import complete
        complete(args.run_id, args.complete, args.keep, args.offset, args.num_completions,
                 args.max_images, seed=generation.get("seed", 0),
                 batch_size=generation.get("batch_size"), index=args.index, random=args.random,
                 gif=generation.get("gif", False), **output, **settings)
    else:
        generate(args.run_id, no_decode=args.no_decode, **generation, **output, **settings)
    print(f"run_id={args.run_id}")


if __name__ == "__main__":
    run_cli(main)
