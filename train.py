"""Train a prior over a tokenizer run's token grids; prints run_id=<id> as the last line.

    python train.py --run_id <tokenizer run> [--prior gpt] --n_layer 4 --n_embd 128 --max_steps 1500
    python train.py --run_id <tokenizer run> --prior gpt --conditional   # on the CSV's labels
    python train.py --path_to_data codes.npy --codebook_size 512
    python train.py --resume_run_id <prior run>

`--prior` picks the family; `python train.py --prior NAME --help` lists that family's flags.
"""

import argparse
import sys

import priors
from core.config import add_flags, given
from pipeline.cli import run_cli
from pipeline.tracking import resolve_run_id
from pipeline.train_prior import TrainConfig, train_prior
from priors.base import DATA_FIELDS


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--prior", default="gpt")
    family = priors.family(first.parse_known_args(argv)[0].prior)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, TrainConfig)
    add_flags(parser.add_argument_group(f"{family.Model.family} prior"), family.Config,
              skip=DATA_FIELDS)
    parser.add_argument("--resume_run_id", help="continue this run from its checkpoints/last.pt")
    args = parser.parse_args(argv)
    run_id = train_prior(given(args, family.Config), given(args, TrainConfig),
                         resume_run_id=resolve_run_id(args.resume_run_id, "--resume_run_id"))
    if run_id is not None:  # under torchrun only rank 0 has it
        print(f"run_id={run_id}")


if __name__ == "__main__":
    run_cli(main)
