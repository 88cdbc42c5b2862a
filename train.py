"""Train the GPT prior over a VQ-VAE run's code grids; prints run_id=<id> as the last line.

    python train.py --run_id <vqvae run> [--codes NAME] --n_layer 4 --n_embd 128 --max_steps 1500
    python train.py --path_to_data codes.npy --codebook_size 512
    python train.py --resume_run_id <prior run>
"""

import argparse

from pipeline.config import add_flags, given
from pipeline.errors import run_cli
from transformer.model import GPTConfig
from transformer.train import TrainConfig, train_prior


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, TrainConfig)
    add_flags(parser, GPTConfig, skip=("vocab_size", "grid_h", "grid_w"))
    parser.add_argument("--resume_run_id", help="continue this run from its checkpoints/last.pt")
    args = parser.parse_args(argv)
    run_id = train_prior(given(args, GPTConfig), given(args, TrainConfig),
                         resume_run_id=args.resume_run_id)
    if run_id is not None:  # under torchrun only rank 0 has it
        print(f"run_id={run_id}")


if __name__ == "__main__":
    run_cli(main)
