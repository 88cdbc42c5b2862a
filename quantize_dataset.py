"""Encode a CSV's images into token grids: with a trained tokenizer run, or by creating a
`pixels` tokenizer run. Logs codes/<name>.npy + .json into the tokenizer run; prints
run_id=<tokenizer run> last.

    python quantize_dataset.py --run_id <tokenizer run> [--path_to_data CSV] [--name NAME]
    python quantize_dataset.py --path_to_data CSV --pixels levels --bits 4 [--image_size 16]
    python quantize_dataset.py --path_to_data CSV --pixels palette --palette_size 16
"""

import argparse

from core.errors import UserError
from pipeline.cli import run_cli
from pipeline.tokenizers import create_pixels_tokenizer, quantize
from pipeline.tracking import resolve_run_id


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", help="a tokenizer run (VQ-VAE or pixels)")
    parser.add_argument("--path_to_data", help="CSV to encode (default: the run's training CSV)")
    parser.add_argument("--name", help="artifact name codes/<name>.npy (default: the CSV's stem)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    pixels = parser.add_argument_group("a new `pixels` tokenizer (instead of --run_id)")
    pixels.add_argument("--pixels", choices=("levels", "palette"),
                        help="levels: 2^bits values per channel (RGB: the r g b byte stream); "
                             "palette: k-means colours of the training pixels")
    pixels.add_argument("--bits", type=int, default=4, help="levels: bits per channel value")
    pixels.add_argument("--palette_size", type=int, default=16, help="palette: k colours")
    pixels.add_argument("--image_size", type=int, help="resize and center-crop to this square "
                                                       "(default: the first image's shorter side)")
    pixels.add_argument("--in_channels", type=int, help="1 or 3 (default: 1 when every image "
                                                        "is grey)")
    pixels.add_argument("--experiment", help="MLflow experiment of the new run")
    args = parser.parse_args(argv)
    if args.pixels:
        if args.run_id:
            raise UserError("give --run_id (an existing tokenizer) or --pixels (a new one), not both")
        if not args.path_to_data:
            raise UserError("--pixels needs --path_to_data (the CSV to encode)")
        run_id = create_pixels_tokenizer(args.path_to_data, args.pixels, args.bits,
                                         args.palette_size, args.image_size, args.in_channels,
                                         experiment=args.experiment)
    elif args.run_id:
        run_id = quantize(resolve_run_id(args.run_id), args.path_to_data, args.name, args.batch_size, args.device)
    else:
        raise UserError("give --run_id <tokenizer run>, or --path_to_data CSV --pixels "
                        "levels|palette")
    print(f"run_id={run_id}")


if __name__ == "__main__":
    run_cli(main)
