"""Does the adversarial loss raise the tokenizer's ceiling? The VQ-VAE trained with and without
`--adversarial_weight`, judged by the quality figures of its reconstructions of held-out images
(pipeline.quality.tokenizer_ceiling) and their PSNR, on two sets that ship with scikit-learn:

- digits: the demo digits (16x16 grayscale, labels: classifier+random feature space), with the
  `small` preset's VQ-VAE settings;
- photos: 32x32 RGB crops of scikit-learn's two sample photographs (china.jpg, flower.jpg);
  training and held-out crops come from alternate 64x64 tiles (a checkerboard), so no held-out
  pixel is trained on (no labels: random feature space).

    python -m benchmarks.bench_adversarial                          # both sets, weights 0 and 0.1
    python -m benchmarks.bench_adversarial --sets photos --weights 0 0.1 0.5 --max_steps 1200

Prints one table row per (set, weight); writes out_dir/<set>_w<weight>.png, held-out originals
(odd columns) beside their reconstructions (even columns), to look at. Runs go to an MLflow store
in out_dir; running the script again re-judges finished runs instead of training them again.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np

PHOTO_CROP, PHOTO_TILE = 32, 64


def write_photo_crops(out_dir, num_train=2000, num_heldout=300, seed=0):
    """Random 32x32 crops of the two photos as PNGs with train.csv / heldout.csv. Each photo is
    cut into 64x64 tiles, alternately training and held-out like a checkerboard; a crop lies
    inside one tile, so no held-out pixel is trained on, and both splits see every part of the
    photos (a left/right split put mostly flat background in the held-out set)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    out_dir = Path(out_dir)
    train_csv, heldout_csv = out_dir / "train.csv", out_dir / "heldout.csv"
    if train_csv.is_file() and heldout_csv.is_file():
        return train_csv, heldout_csv
    rng = np.random.default_rng(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    photos = load_sample_images().images
    tiles = {"train": [], "heldout": []}  # (photo, top, left) of every whole tile
    for p, photo in enumerate(photos):
        for row in range(photo.shape[0] // PHOTO_TILE):
            for col in range(photo.shape[1] // PHOTO_TILE):
                split = "train" if (row + col) % 2 == 0 else "heldout"
                tiles[split].append((p, row * PHOTO_TILE, col * PHOTO_TILE))
    rows = {"train": [], "heldout": []}
    for split, count in (("train", num_train), ("heldout", num_heldout)):
        for i in range(count):
            p, top, left = tiles[split][rng.integers(len(tiles[split]))]
            top += rng.integers(0, PHOTO_TILE - PHOTO_CROP + 1)
            left += rng.integers(0, PHOTO_TILE - PHOTO_CROP + 1)
            crop = photos[p][top:top + PHOTO_CROP, left:left + PHOTO_CROP]
            name = f"images/{split}_{i:04d}.png"
            Image.fromarray(crop).save(out_dir / name)
            rows[split].append(name)
    for path, split in ((train_csv, "train"), (heldout_csv, "heldout")):
        path.write_text("image_path\n" + "\n".join(rows[split]) + "\n")
    return train_csv, heldout_csv


def finished_run(key):
    """A finished training of this benchmark's store with the same settings (re-running the
    script re-judges it instead of training again), or None."""
    from pipeline import tracking
    runs = tracking.client().search_runs(
        [tracking.experiment_id(f"bench-adversarial-{key.split('-')[0]}")],
        filter_string=f"tags.`bench.key` = '{key}' and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def load(csv, channels, size):
    import torch
    from pipeline.images import ImageData, read_table
    data = ImageData(read_table(csv), channels, size)
    return torch.cat(list(data.ordered(range(len(data)), 512))).float() / 255, data.table.labels


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["digits", "photos"],
                        choices=["digits", "photos"])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.1])
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--adversarial_start", type=int, default=None,
                        help="default: half of --max_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="/tmp/vqtoolkit_bench_adversarial")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is far faster on a CPU that others share)")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out_dir / 'mlflow.db'}"
    os.chdir(out_dir)  # artifacts and local checkpoints land here, not in the worktree

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.demo_data import write_digits
    from pipeline.images import file_sha256
    from pipeline.quality import QualityReference, run_ceiling
    from pipeline.run import PRESETS, split_flags
    from pipeline.visual import reconstruction_grid, save_png
    from pipeline.runs import load_run_checkpoint
    from vqvae.model import VQVAEConfig
    from image_tokenizers import from_checkpoint as tokenizer_from_checkpoint
    from pipeline.train_tokenizer import TrainConfig, train_vqvae

    start = args.adversarial_start if args.adversarial_start is not None else args.max_steps // 2
    small = PRESETS["small"]["vqvae"]
    sets = {
        "digits": (write_digits(out_dir / "digits"), 1, {**small}),
        "photos": (write_photo_crops(out_dir / "photos"), 3,
                   {**small, "image_size": 32, "codebook_size": 128}),
    }
    print(f"torch threads {torch.get_num_threads()}; {args.max_steps} steps, adversarial loss "
          f"from step {start}; the ceiling of best.pt (pipeline.quality.tokenizer_ceiling: "
          f"PSNR on held-out images, the other figures of reconstructed training images vs "
          f"held-out)")
    header = (f"{'set':8s}{'weight':>8s}{'PSNR dB':>9s}{'FD ratio':>10s}{'precision':>11s}"
              f"{'recall':>8s}{'confidence':>12s}{'real P/R/conf':>17s}{'train s':>9s}  space")
    print(header)
    for name in args.sets:
        (train_csv, heldout_csv), channels, settings = sets[name]
        settings = {**settings, "max_steps": args.max_steps, "seed": args.seed}
        train_images, train_labels = load(train_csv, channels, settings["image_size"])
        heldout, heldout_labels = load(heldout_csv, channels, settings["image_size"])
        reference = QualityReference(heldout, train_images, train_labels, heldout_labels,
                                     seed=args.seed)
        for weight in args.weights:
            model_flags, train_flags = split_flags(settings, VQVAEConfig, TrainConfig)
            train_flags = {**train_flags, "path_to_data": str(train_csv), "in_channels": channels,
                           "experiment": f"bench-adversarial-{name}",
                           "adversarial_weight": weight, "adversarial_start": start,
                           "val_fraction": 0.1}
            key = (f"{name}-w{weight:g}-steps{args.max_steps}-start{start}-seed{args.seed}-"
                   f"data{file_sha256(train_csv)[:8]}")
            started = time.perf_counter()
            run_id, seconds = finished_run(key), "reused"
            if run_id is None:
                run_id = train_vqvae(model_flags, train_flags, progress=False,
                                     tags={"bench.key": key})
                seconds = f"{time.perf_counter() - started:.0f}"
            ceiling, _ = run_ceiling(run_id, reference)
            confidence = ceiling.get("classifier_confidence", float("nan"))
            real_confidence = ceiling.get("real_classifier_confidence", float("nan"))
            print(f"{name:8s}{weight:8.2f}{ceiling['psnr']:9.2f}{ceiling['fd_ratio']:10.3f}"
                  f"{ceiling['precision']:11.3f}{ceiling['recall']:8.3f}{confidence:12.3f}"
                  f"{ceiling['real_precision']:6.2f}/{ceiling['real_recall']:.2f}/"
                  f"{real_confidence:.2f}"
                  f"{seconds:>9s}  {ceiling['feature_space']}", flush=True)
            model = tokenizer_from_checkpoint(load_run_checkpoint(run_id, "tokenizer", "vqvae"))
            with torch.no_grad():
                shown = heldout[:32]
                recon = model.decode(model.encode(shown))
            save_png(reconstruction_grid(shown, recon, ncol=4), out_dir / f"{name}_w{weight:g}.png")
    print(f"reconstructions: {out_dir}/<set>_w<weight>.png (original | reconstruction pairs)")


if __name__ == "__main__":
    main()
