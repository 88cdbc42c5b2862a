"""Encode a CSV's images into token grids: with a trained tokenizer run, or by creating a run of
a fitted tokenizer kind (`pixels`). Logs codes/<name>.npy + .json into the tokenizer run;
prints run_id=<tokenizer run> last.

    python quantize_dataset.py --run_id <tokenizer run> [--path_to_data CSV] [--name NAME]
    python quantize_dataset.py --path_to_data CSV --tokenizer pixels --mode levels --bits 4
    python quantize_dataset.py --path_to_data CSV --tokenizer pixels --mode palette --palette_size 16
    python quantize_dataset.py --path_to_data CSV --pixels levels --bits 4   # the same, shorter

`python quantize_dataset.py --tokenizer KIND --help` lists that kind's flags.
"""

import argparse
import sys

import image_tokenizers
from core.config import add_flags, given
from core.errors import UserError
from pipeline.cli import run_cli
from pipeline.device import PRECISION_HELP, PRECISIONS
from pipeline.tokenizers import FitConfig, fit_tokenizer, quantize
from pipeline.tracking import resolve_run_id


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--tokenizer")
    first.add_argument("--pixels", choices=("levels", "palette"))
    known = first.parse_known_args(argv)[0]
    kind = known.tokenizer or ("pixels" if known.pixels else None)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", help="a tokenizer run (any kind): encode with it")
    parser.add_argument("--name", help="artifact name codes/<name>.npy (default: the CSV's stem)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help=PRECISION_HELP + " (with --run_id: the encoder's)")
    fitted = [name for name in image_tokenizers.KINDS
              if image_tokenizers.kind(name).Model.fitted]
    new = parser.add_argument_group("a new run of a fitted tokenizer kind (instead of --run_id)")
    new.add_argument("--tokenizer", help=f"the kind: {', '.join(fitted)}")
    new.add_argument("--pixels", choices=("levels", "palette"),
                     help="short for --tokenizer pixels --mode MODE")
    add_flags(new, FitConfig, skip=("path_to_data",))
    parser.add_argument("--path_to_data", help="CSV or folder of images to encode (default: "
                                               "the run's training data)")
    if kind is not None:
        module = image_tokenizers.kind(kind)
        if not module.Model.fitted:
            raise UserError(f"--tokenizer {kind} is trained by steps: train it with "
                            f"train_vqvae.py, then quantize with --run_id")
        add_flags(parser.add_argument_group(f"the {kind} tokenizer"), module.Config,
                  skip=("in_channels",))
    args = parser.parse_args(argv)
    if kind is not None:
        if args.run_id:
            raise UserError("give --run_id (an existing tokenizer) or --tokenizer (a new one), "
                            "not both")
        if not args.path_to_data:
            raise UserError(f"--tokenizer {kind} needs --path_to_data (the CSV to encode)")
        model_flags = given(args, module.Config)
        if args.pixels:
            model_flags.setdefault("mode", args.pixels)
        fit_flags = {**given(args, FitConfig), "path_to_data": args.path_to_data}
        run_id = fit_tokenizer(kind, model_flags, fit_flags, codes_name=args.name)
    elif args.run_id:
        run_id = quantize(resolve_run_id(args.run_id), args.path_to_data, args.name,
                          args.batch_size, args.device, precision=args.precision)
    else:
        raise UserError("give --run_id <tokenizer run>, or --path_to_data CSV --tokenizer "
                        f"{'|'.join(fitted)}")
    print(f"run_id={run_id}")


if __name__ == "__main__":
    run_cli(main)
