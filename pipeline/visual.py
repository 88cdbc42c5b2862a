"""Turning image tensors into PNGs and grids."""

import os
from pathlib import Path

import torch
from PIL import Image


def to_uint8(images):
    """(B, C, S, S) floats in [0, 1] -> uint8 numpy (B, S, S) or (B, S, S, 3)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


def image_grid(images, ncol=8, min_cell=64, pad=2):
    """(B, C, S, S) in [0, 1] -> one PIL image, cells enlarged (nearest) to at least `min_cell`
    pixels so that 16x16 images are visible in the MLflow UI."""
    from torchvision.utils import make_grid
    scale = max(1, -(-min_cell // images.shape[-1]))
    big = torch.nn.functional.interpolate(images.float().cpu().clamp(0, 1), scale_factor=scale,
                                          mode="nearest")
    grid = make_grid(big, nrow=ncol, padding=pad, pad_value=0.5)  # (3, H, W)
    return Image.fromarray(to_uint8(grid[None])[0])


def side_by_side(originals, reconstructions, ncol=8):
    """Grid of (original, reconstruction) pairs next to each other, ncol/2 pairs per row."""
    pairs = torch.stack([originals.cpu().float(), reconstructions.cpu().float()], 1)
    return image_grid(pairs.flatten(0, 1), ncol=ncol)


def save_pngs(images, out_dir, prefix="sample"):
    """Write each image as out_dir/{prefix}_{i:04d}.png (atomically); return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(to_uint8(images)):
        path = out_dir / f"{prefix}_{i:04d}.png"
        save_png(Image.fromarray(array), path)
        paths.append(path)
    return paths


def save_png(image, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)

