"""Train a VQ-VAE on a CSV of images; prints run_id=<id> as the last line.

    python train_vqvae.py --path_to_data data/train.csv --image_size 32 --max_steps 5000
    python train_vqvae.py --resume_run_id <id>
    python train_vqvae.py --path_to_data data/train.csv --adversarial_weight 0.1 \\
        --adversarial_start 2000 --accumulate 2       # patch-GAN loss; 2 micro-batches per step
    python train_vqvae.py --path_to_data photos.csv --image_size 64 --downsample 16 \
        --block vqgan --channel_mult 1,1,2,2,4 --attn_resolutions 4 --ema_decay 0.995 --hflip
"""

import argparse

from core.config import add_flags, given
from pipeline.cli import run_cli
from pipeline.tracking import resolve_run_id
from vqvae.model import VQVAEConfig
from pipeline.train_tokenizer import TrainConfig, train_vqvae


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, TrainConfig)
    add_flags(parser, VQVAEConfig, skip=("in_channels",))
    parser.add_argument("--resume_run_id", help="continue this run from its checkpoints/last.pt")
    args = parser.parse_args(argv)
    run_id = train_vqvae(given(args, VQVAEConfig), given(args, TrainConfig),
                         resume_run_id=resolve_run_id(args.resume_run_id, "--resume_run_id"))
    if run_id is not None:  # under torchrun only rank 0 has it
        print(f"run_id={run_id}")


if __name__ == "__main__":
    run_cli(main)
