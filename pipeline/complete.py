"""Completion: encode real images, keep a region's tokens, let the prior draw the rest.

    --keep top | left | center | random:P     the kept region (in pixels; every token of a kept
                                              pixel or VQ cell is kept)
    --offset N                                keep the first N tokens in raster order

Image GPT's half-image figure is logged to the prior run (key `completions`): one row per image,
the input with the hidden region greyed | N completions | the original. A raster prior (GPT,
PixelCNN family) accepts only raster prefixes (top, offset); absorbing diffusion any mask.
"""

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import tracking
from pipeline.codes import codes_dtype
from pipeline.device import pick_device
from core.errors import UserError
import priors
from pipeline.generate import LoadedPrior, sample_tokens
from pipeline.images import ImageData, read_table
from pipeline.visual import image_grid, save_png, save_pngs

GREY = 0.5


def keep_mask(keep, offset, n, grid, values_per_pixel, seed=0):
    """(n, h, w) bool, True for the tokens to keep."""
    h, w = grid
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    if offset is not None:
        if not 0 <= offset <= h * w:
            raise UserError(f"--offset must be in 0..{h * w} (the tokens of one image), got {offset}")
        mask.view(n, -1)[:, :offset] = True
        return mask
    width = w // values_per_pixel  # in pixels (or VQ cells)
    pixels = torch.zeros(n, h, width, dtype=torch.bool)
    if keep == "top":
        pixels[:, :h // 2] = True
    elif keep == "left":
        pixels[:, :, :width // 2] = True
    elif keep == "center":
        pixels[:, h // 4:h // 4 + (h + 1) // 2, width // 4:width // 4 + (width + 1) // 2] = True
    elif keep.startswith("random:"):
        try:
            share = float(keep.split(":", 1)[1])
        except ValueError:
            share = -1.0
        if not 0 <= share <= 1:
            raise UserError(f"--keep random:P needs P in [0, 1], got '{keep}'")
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.rand(n, h, width, generator=generator) < share
    else:
        raise UserError(f"--keep must be top, left, center or random:P, got '{keep}'")
    return pixels.repeat_interleave(values_per_pixel, 2)


def complete(run_id, path_to_data, keep="top", offset=None, num_completions=4, max_images=8,
             out_dir=None, seed=0, batch_size=None, device=None, name=None, **settings):
    """Complete the first `max_images` images of a CSV `num_completions` times each; log the
    figure and codes to the prior run, write PNGs to out_dir. `settings` are the fields of the
    prior family's sampling dataclass (priors.sampling_class; None: not given). Returns (kept
    tokens (N, h, w), known mask (N, h, w), completions (N, num_completions, h, w), figure PIL
    image)."""
    if num_completions < 1 or max_images < 1:
        raise UserError("--num_completions and --max_images must be at least 1")
    device = pick_device(device)
    prior = LoadedPrior(run_id, device)
    drawn_with = dataclasses.asdict(priors.sampling_settings(prior.family, settings))
    run_id, tokenizer = prior.run_id, prior.tokenizer()
    table = read_table(path_to_data)
    data = ImageData(table, tokenizer.in_channels, tokenizer.image_size)
    count = min(max_images, len(data))
    images = torch.cat(list(data.ordered(range(count), 256))).float() / 255
    tokens = tokenizer.encode(images)  # (N, h, w)
    known_mask = keep_mask(keep, offset, count, tokenizer.grid, tokenizer.values_per_pixel, seed)
    labels = None
    if prior.classes and data.table.labels is not None:  # complete each image as its own class
        labels = prior.class_ids(data.table.labels[:count], f"{path_to_data} label column")

    repeat = lambda x: x.repeat_interleave(num_completions, 0) if x is not None else None
    total = count * num_completions
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    drawn = sample_tokens(prior.model, total, batch_size or total, repeat(labels), generator,
                          known=repeat(tokens), known_mask=repeat(known_mask), **drawn_with)
    seconds = time.perf_counter() - start
    kept = repeat(known_mask)
    if not torch.equal(drawn[kept], repeat(tokens)[kept]):  # the interface's promise
        raise RuntimeError(f"the {prior.family} prior changed kept tokens")
    print(f"completed {count} images x {num_completions} in {seconds:.2f} s", file=sys.stderr)

    completions = tokenizer.decode(drawn).view(count, num_completions, *images.shape[1:])
    shown = torch.where(tokenizer.known_pixels(known_mask), images, torch.full_like(images, GREY))
    rows = torch.cat([shown[:, None], completions, images[:, None]], 1)  # (N, 2 + n, C, S, S)
    figure = image_grid(rows.flatten(0, 1), ncol=num_completions + 2)

    name = name or time.strftime("complete-%Y%m%d-%H%M%S")
    tracking.log_image(run_id, figure, "completions", step=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        save_pngs(rows.flatten(0, 1), folder, prefix="row")
        save_png(figure, folder / "figure.png")
        np.save(folder / "codes.npy", drawn.view(count, num_completions, *tokens.shape[1:])
                .numpy().astype(codes_dtype(tokenizer.vocab_size)))
        tracking.log_artifacts(run_id, folder, f"completions/{name}")
    tracking.log_json(run_id, {"csv": str(path_to_data), "keep": keep, "offset": offset,
                               "num_images": count, "num_completions": num_completions,
                               "seed": seed, **drawn_with},
                      f"completions/{name}/settings.json")
    if out_dir:
        out = Path(out_dir)
        save_pngs(completions.flatten(0, 1), out, prefix="completion")
        save_png(figure, out / "completions.png")
        print(f"wrote {total} completions and completions.png to {out}", file=sys.stderr)
    return tokens, known_mask, drawn.view(count, num_completions, *tokens.shape[1:]), figure
