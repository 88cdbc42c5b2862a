"""The demo data set: real handwritten digits that need no network.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set (1,797 digits
from 43 writers, 8x8 pixels, 17 grey levels; Alpaydin & Kaynak 1998, CC BY 4.0) inside its
wheel. We write them as 16x16 grayscale PNGs (bilinear upsampling) with two CSVs:
`train.csv` (the first 1,500, shuffled with a fixed seed) and `heldout.csv` (the other 297),
which no stage trains on and is kept for judging samples.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.visual import save_png

NUM_TRAIN = 1500


def write_digits(out_dir, size=16):
    """Write PNGs and train.csv / heldout.csv to out_dir (skipped when already there)."""
    from sklearn.datasets import load_digits
    out_dir = Path(out_dir)
    train_csv, heldout_csv = out_dir / "train.csv", out_dir / "heldout.csv"
    if train_csv.is_file() and heldout_csv.is_file():
        return train_csv, heldout_csv
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for rank, i in enumerate(order):
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
        name = f"images/digit_{rank:04d}.png"
        save_png(image, out_dir / name)
        lines.append(f"{name},{int(digits.target[i])}")
    for path, rows in ((train_csv, lines[:NUM_TRAIN]), (heldout_csv, lines[NUM_TRAIN:])):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("image_path,label\n" + "\n".join(rows) + "\n")
        tmp.replace(path)
    return train_csv, heldout_csv
