"""The VQ-VAE's VQGAN options, one at a time against the plain VQ-VAE: the weight average
(--ema_decay), horizontal flips (--hflip), self-attention at the code grid
(--attn_resolutions), the VQGAN layout (--block vqgan with --channel_mult and attention) and
16x downsampling (--downsample 16). Each is trained with the `small` preset's VQ-VAE settings on
the demo digits (1,500 for training, 10% of them held out for validation), the same steps and
seed, and judged by its ceiling (pipeline.quality.tokenizer_ceiling): PSNR on the 297 held-out
digits, and the quality figures of reconstructed training digits against them.

    python -m experiments.vqgan_options                       # every variant, 600 steps
    python -m experiments.vqgan_options --variants plain vqgan --max_steps 1200

16x downsampling of a 16 px digit leaves a 1x1 grid, so that pair is on the digits resized to
32 px: f8 (a 4x4 grid, as many codes as the 16 px rows) against f16 (2x2). Prints a markdown
table (docs/tokenizers.md keeps one); writes out_dir/<variant>.png, 32 held-out digits (left)
and their reconstructions (right). Runs go to an MLflow store in out_dir; running the
script again re-judges finished runs instead of training them again.
"""

import argparse
import os
import time
from pathlib import Path

# name -> (image size, flags on top of the small preset's VQ-VAE settings)
VARIANTS = {
    "plain": (16, {}),
    "ema": (16, {"ema_decay": 0.995}),
    "hflip": (16, {"hflip": True}),
    "attention": (16, {"attn_resolutions": "4"}),
    # as wide as the plain model at the code grid (64), half as wide at 16 px, one block a level
    "vqgan": (16, {"block": "vqgan", "channels": 32, "channel_mult": "1,2,2",
                   "n_res_blocks": 1, "attn_resolutions": "4"}),
    "plain 32px f8": (32, {"downsample": 8}),
    "32px f16": (32, {"downsample": 16}),
}


def flags_text(flags):
    return " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in flags.items()) or "-"


def finished_run(key):
    """A finished training of this store with the same settings, or None."""
    from pipeline import tracking
    runs = tracking.client().search_runs(
        [tracking.experiment_id("vqgan-options")],
        filter_string=f"tags.`experiment.key` = '{key}' and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def load(csv, size):
    import torch
    from pipeline.images import ImageData, read_table
    data = ImageData(read_table(csv), 1, size)
    return torch.cat(list(data.ordered(range(len(data)), 512))).float() / 255, data.table.labels


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="the trainings' seed")
    parser.add_argument("--out_dir", default="/tmp/vqtoolkit_vqgan_options")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is far faster on a CPU that others share)")
    args = parser.parse_args()
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out_dir / 'mlflow.db'}"
    os.chdir(out_dir)  # artifacts and local checkpoints land here, not in the worktree

    import torch
    torch.set_num_threads(args.threads)
    from core.config import build
    from pipeline import tracking
    from pipeline.demo_data import write_digits
    from pipeline.images import file_sha256
    from pipeline.quality import QualityReference, run_ceiling
    from pipeline.run import PRESETS, split_flags
    from pipeline.tokenizers import load_tokenizer
    from pipeline.train_tokenizer import TrainConfig, train_vqvae
    from pipeline.visual import reconstruction_grid, save_png
    from vqvae.model import VQVAEConfig

    sets, references = {}, {}
    for size in sorted({VARIANTS[name][0] for name in args.variants}):
        train_csv, heldout_csv = write_digits(out_dir / f"digits{size}", size=size)
        train_images, train_labels = load(train_csv, size)
        heldout, heldout_labels = load(heldout_csv, size)
        sets[size] = train_csv, heldout
        # one judge whatever --seed trains with, so seeds show the trainings' spread alone
        references[size] = QualityReference(heldout, train_images, train_labels, heldout_labels,
                                            seed=0)
    print(f"torch threads {torch.get_num_threads()}; {args.max_steps} steps, seed {args.seed}; "
          f"the ceiling of best.pt (PSNR on the held-out digits; the other figures: "
          f"reconstructed training digits against them)\n")
    print("| variant | flags | image, grid | PSNR (dB) | FD ratio | precision | recall | "
          "confidence | codebook usage | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    real = {}
    for name in args.variants:
        size, flags = VARIANTS[name]
        train_csv, heldout = sets[size]
        settings = {**PRESETS["small"]["vqvae"], "image_size": size, **flags,
                    "max_steps": args.max_steps, "seed": args.seed}
        model_flags, train_flags = split_flags(settings, VQVAEConfig, TrainConfig)
        train_flags = {**train_flags, "path_to_data": str(train_csv), "in_channels": 1,
                       "experiment": "vqgan-options"}
        key = (f"{name}-steps{args.max_steps}-seed{args.seed}-"
               f"data{file_sha256(train_csv)[:8]}").replace(" ", "_")
        started = time.perf_counter()
        run_id, seconds = finished_run(key), "reused"
        if run_id is None:
            run_id = train_vqvae(model_flags, train_flags, progress=False,
                                 tags={"experiment.key": key})
            seconds = f"{time.perf_counter() - started:.0f}"
        ceiling, _ = run_ceiling(run_id, references[size])
        real[size] = ceiling
        usage = tracking.client().get_run(run_id).data.metrics["val/codebook_usage"]
        config = build(VQVAEConfig, model_flags)
        print(f"| {name} | {flags_text(flags)} | {size} px, {config.grid_size}x"
              f"{config.grid_size} | {ceiling['psnr']:.2f} | {ceiling['fd_ratio']:.3f} | "
              f"{ceiling['precision']:.3f} | {ceiling['recall']:.3f} | "
              f"{ceiling['classifier_confidence']:.3f} | {usage:.2f} | {seconds} |", flush=True)
        tokenizer = load_tokenizer(run_id, "cpu")  # the averaged weights, where there are some
        shown = heldout[:32]
        save_png(reconstruction_grid(shown, tokenizer.reconstruct(shown), ncol=4),
                 out_dir / f"{name.replace(' ', '_')}.png")
    for size, ceiling in sorted(real.items()):
        print(f"\nreal {size} px training digits against the held-out ones: precision "
              f"{ceiling['real_precision']:.3f}, recall {ceiling['real_recall']:.3f}, classifier "
              f"confidence {ceiling['real_classifier_confidence']:.3f}")
    print(f"reconstructions: {out_dir}/<variant>.png (originals | reconstructions)")


if __name__ == "__main__":
    main()
