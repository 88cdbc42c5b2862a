"""Sample token grids from a trained prior (any family) and decode them to images; or complete
real images from a kept region.

    python transformer_generation.py --run_id <prior run> --num_samples 64 --out_dir samples/
    python transformer_generation.py --run_id <prior run> --labels 3,3,7 --guidance 3
    python transformer_generation.py --run_id <prior run> --labels all --num_samples 40
    python transformer_generation.py --run_id <prior run> --complete heldout.csv --keep top \\
        --num_completions 4 --out_dir completions/
"""

import argparse

from pipeline.cli import run_cli
from pipeline.generate import TONE_SAMPLES, generate
from pipeline.tracking import resolve_run_id

SAMPLER_FLAGS = ("sampler", "choice_temperature", "grid_h", "grid_w")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", required=True,
                        help="the prior run (or models:/NAME/VERSION, models:/NAME@alias)")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, help="grids sampled at once (default: all)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the log-probabilities of every drawn token (0 = always "
                             "the likeliest; < 1 sharper, > 1 flatter)")
    parser.add_argument("--top_k", type=int, help="sample among the k likeliest values")
    parser.add_argument("--top_p", type=float, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--labels", help="conditional priors: one sample per listed label, in "
                                         "order ('3,3,7'), or 'all' (each class in turn for "
                                         "--num_samples)")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance weight w: log p = log p_uncond + w (log "
                             "p_cond - log p_uncond); 1 = plain conditional, 0 = unconditional")
    sampler = parser.add_argument_group("parallel decoding (the absorbing prior)")
    sampler.add_argument("--steps", type=int, help="network evaluations per grid (default: as "
                                                   "many as tokens)")
    sampler.add_argument("--sampler", help="absorbing (the reverse process) or maskgit "
                                           "(confidence decoding)")
    sampler.add_argument("--choice_temperature", type=float,
                         help="maskgit: scale of the Gumbel noise on the confidences that pick "
                              "which drawn tokens stay, annealed linearly to 0 over the steps")
    sampler.add_argument("--grid_h", type=int, help="sample a grid taller than the training one")
    sampler.add_argument("--grid_w", type=int, help="sample a grid wider than the training one")
    completion = parser.add_argument_group("completion")
    completion.add_argument("--complete", metavar="CSV", help="complete these images instead "
                                                               "of sampling from scratch")
    completion.add_argument("--keep", default="top", help="top, left, center or random:P")
    completion.add_argument("--offset", type=int, help="keep the first N tokens (overrides --keep)")
    completion.add_argument("--num_completions", type=int, default=4)
    completion.add_argument("--max_images", type=int, default=8, help="images of the CSV to complete")
    parser.add_argument("--tone_samples", type=int, default=TONE_SAMPLES,
                        help="VQ-VAE tokenizers: grids of the draw that fits tone matching, "
                             "which gives the samples the training images' distribution of pixel "
                             "values (README, *Tone matching*); drawn once per setting and kept "
                             "on the prior run; 0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="artifact name generated/<name>.npy (default: timestamp)")
    parser.add_argument("--out_dir", help="also write the decoded PNGs here")
    parser.add_argument("--no_decode", action="store_true", help="only sample and log the codes")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    args.run_id = resolve_run_id(args.run_id)  # a models:/ URI names its run
    options = {k: getattr(args, k) for k in SAMPLER_FLAGS if getattr(args, k) is not None}
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    guidance=args.guidance, steps=args.steps, seed=args.seed,
                    out_dir=args.out_dir, name=args.name, device=args.device,
                    batch_size=args.batch_size, **options)
    if args.complete:
        from pipeline.complete import complete
        complete(args.run_id, args.complete, args.keep, args.offset, args.num_completions,
                 args.max_images, **settings)
    else:
        generate(args.run_id, args.num_samples, no_decode=args.no_decode, labels=args.labels,
                 tone_samples=args.tone_samples, **settings)
    print(f"run_id={args.run_id}")


if __name__ == "__main__":
    run_cli(main)
