"""A labelled RGB data set made here, for trying the toolkit on colour images bigger than the
demo's digits: discs, squares and triangles of random size, place and colour on a two-colour
gradient, drawn with PIL at 4x and downsampled (anti-aliased edges).

    python -m experiments.shapes --out shapes --size 32 --train 800 --heldout 200
    python -m pipeline --path_to_data shapes/train --heldout shapes/heldout --out_dir out \
        --minutes 5

Written in torchvision's ImageFolder layout (a folder per class, so the class is the label):
shapes/train/<class>/*.png and shapes/heldout/<class>/*.png, with train.csv and heldout.csv
beside them for commands that take CSVs. Rerunning with the same flags writes the same bytes.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disc", "square", "triangle")
SUPERSAMPLE = 4


def draw_shape(rng, size):
    """One image (size x size RGB) and its class index."""
    big = size * SUPERSAMPLE
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, big)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).repeat(big, 1).astype(np.uint8)
    image = Image.fromarray(background)
    label = int(rng.integers(len(CLASSES)))
    radius = rng.uniform(0.18, 0.38) * big
    cx, cy = rng.uniform(radius, big - radius, 2)
    # a colour far from the background's mean, so every shape shows
    colour = tuple(int(v) for v in (255 - (top + bottom) / 2 + rng.integers(-40, 41, 3)) % 256)
    draw = ImageDraw.Draw(image)
    if CLASSES[label] == "disc":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif CLASSES[label] == "square":
        angle = rng.uniform(0, np.pi / 2)
        corners = [(cx + radius * np.cos(angle + k * np.pi / 2),
                    cy + radius * np.sin(angle + k * np.pi / 2)) for k in range(4)]
        draw.polygon(corners, fill=colour)
    else:
        angle = rng.uniform(0, 2 * np.pi / 3)
        corners = [(cx + radius * np.cos(angle + k * 2 * np.pi / 3),
                    cy + radius * np.sin(angle + k * 2 * np.pi / 3)) for k in range(3)]
        draw.polygon(corners, fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS), label


def write_split(out, name, count, size, rng):
    rows = []
    for i in range(count):
        image, label = draw_shape(rng, size)
        path = Path(name) / CLASSES[label] / f"{name}_{i:05d}.png"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        image.save(out / path)
        rows.append(f"{path.as_posix()},{CLASSES[label]}")
    (out / f"{name}.csv").write_text("image_path,label\n" + "\n".join(rows) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out, rng = Path(args.out), np.random.default_rng(args.seed)
    write_split(out, "train", args.train, args.size, rng)
    write_split(out, "heldout", args.heldout, args.size, rng)
    print(f"wrote {args.train} + {args.heldout} {args.size}px images of {', '.join(CLASSES)} "
          f"to {out}/")


if __name__ == "__main__":
    main()
