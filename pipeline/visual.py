"""Turning image tensors into PNGs and grids a person can read (tracking.log_step_image logs them at a step).

Grids are enlarged with nearest-neighbour so that one image is at least 64 pixels wide, and
say what they show in a header drawn with PIL's bitmap font.

How MLflow 3.17's run page shows an image logged at a step (Model metrics tab): a card of fixed
height holds the run's name, then all its params as text, then a square box as wide as that
text (about 400 px) with the card image (the `+compressed` file) at its natural size, centred,
and below the box the step slider. A small image (MLflow's own is at most 256 px) therefore sits
below a grey band, under the params, out of the card's view: the "empty grey box". A square
image at least as large as the box fills it from the top, so that the header and the first row
of a grid show under the params; the card's fullscreen button or a click on the image shows all.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CARD_SIZE = 512  # the card image's longer side: at least the card's box (see above)
GAP = (128, 128, 128)  # between images
HEADER = (235, 235, 235)  # behind the header text
HEADER_HEIGHT = 16  # PIL's bitmap font is 11 pixels tall


def to_uint8(images):
    """(B, C, H, W) floats in [0, 1] -> uint8 numpy (B, H, W) or (B, H, W, 3)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


# helpers

def _cells(images, min_cell):
    """(B, C, H, W) in [0, 1] -> uint8 RGB (B, H', W', 3), enlarged by the integer factor that
    makes the shorter side at least min_cell (images larger than the training size are wider
    or taller)."""
    scale = max(1, -(-min_cell // min(images.shape[-2:])))
    big = torch.nn.functional.interpolate(images.float().cpu().clamp(0, 1), scale_factor=scale,
                                          mode="nearest")
    cells = to_uint8(big)
    return np.repeat(cells[..., None], 3, axis=-1) if cells.ndim == 3 else cells


def _block(cells, ncol, pad):
    """Cells (B, H, W, 3) in rows of ncol, pad pixels apart -> one uint8 array."""
    n, h, w = cells.shape[:3]
    rows = -(-n // ncol)
    block = np.empty((rows * h + (rows - 1) * pad, ncol * w + (ncol - 1) * pad, 3), np.uint8)
    block[:] = GAP
    for i, cell in enumerate(cells):
        r, c = divmod(i, ncol)
        block[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = cell
    return block


def _with_header(blocks, titles, pad, gap):
    """Blocks side by side, `gap` apart, each under its title -> PIL image."""
    height = max(b.shape[0] for b in blocks)
    width = sum(b.shape[1] for b in blocks) + gap * (len(blocks) - 1) + 2 * pad
    canvas = np.empty((HEADER_HEIGHT + height + pad, width, 3), np.uint8)
    canvas[:] = GAP
    canvas[:HEADER_HEIGHT] = HEADER
    x, spans = pad, []
    for block in blocks:
        canvas[HEADER_HEIGHT:HEADER_HEIGHT + block.shape[0], x:x + block.shape[1]] = block
        spans.append((x, x + block.shape[1]))
        x += block.shape[1] + gap
    image = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default_imagefont()
    for (left, right), title in zip(spans, titles):
        text_width = draw.textlength(title, font=font)
        draw.text(((left + right - text_width) // 2, 3), title, fill=(0, 0, 0), font=font)
    return image


def _with_row_titles(block, titles, pad):
    """A column of titles left of a block of len(titles) equal rows, each beside its row."""
    font = ImageFont.load_default_imagefont()
    width = max(int(font.getlength(t)) for t in titles) + 2 * pad + 4
    canvas = Image.new("RGB", (width + pad + block.shape[1], block.shape[0]), HEADER)
    canvas.paste(Image.fromarray(block), (width + pad, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = (block.shape[0] + pad) / len(titles)
    for r, title in enumerate(titles):
        draw.text((pad + 2, int(r * row_height + (row_height - pad) / 2) - 5), title,
                  fill=(0, 0, 0), font=font)
    return np.array(canvas)


# grids

def image_grid(images, ncol=8, min_cell=64, pad=2, title=None, row_titles=None):
    """(B, C, S, S) in [0, 1] -> one PIL image, ncol images a row, each enlarged (nearest) to at
    least `min_cell` pixels; with a title, under a header that says it (e.g. "16 samples");
    with row_titles, each row's (e.g. "row 15") in a column on the left."""
    ncol = min(ncol, len(images))
    block = _block(_cells(images, min_cell), ncol, pad)
    if row_titles is not None:
        block = _with_row_titles(block, row_titles, pad)
    if title is None:
        framed = np.empty((block.shape[0] + 2 * pad, block.shape[1] + 2 * pad, 3), np.uint8)
        framed[:] = GAP
        framed[pad:-pad, pad:-pad] = block
        return Image.fromarray(framed)
    return _with_header([block], [title], pad, gap=0)


def reconstruction_grid(originals, reconstructions, ncol=2, min_cell=64, pad=2, gap=10):
    """The originals on the left under "original", their reconstructions at the same places on
    the right under "reconstruction". Eight pairs with ncol=2 make a square image."""
    return _with_header([_block(_cells(originals, min_cell), ncol, pad),
                         _block(_cells(reconstructions, min_cell), ncol, pad)],
                        ["original", "reconstruction"], pad, gap)


def card_image(image, size=CARD_SIZE):
    """`image` for the run page's card: enlarged by the whole factor (nearest, so pixels stay
    sharp) that makes its longer side at least `size`, or shrunk to `size` when larger."""
    longer = max(image.size)
    if longer > size:
        scale = size / longer
        return image.resize((max(1, round(image.width * scale)),
                             max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    factor = -(-size // longer)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


# files

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
