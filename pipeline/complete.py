"""Completion: encode real images, keep a region's tokens, let the prior draw the rest.

    --keep top | left | center | random:P     the kept region (in pixels; every token of a kept
                                              pixel or VQ cell is kept)
    --offset N                                keep the first N tokens in raster order
    --index 0-10,15 | --random N              which of the CSV's rows (counted from 0, the
                                              first row under the header; ranges inclusive),
                                              or N rows drawn with --seed; default: the first
                                              --max_images rows

Image GPT's half-image figure is logged to the prior run (key `completions`): one row per image,
labelled with its CSV row (`row 15`), the input with the hidden region greyed | N completions |
the original; completions/<name>/settings.json records the rows. A raster prior (GPT, PixelCNN
family) accepts only raster prefixes (top, offset); absorbing diffusion any mask. --gif adds
completions/<name>/completion.gif, the completions as they are drawn.
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
from pipeline.generate import LoadedPrior, log_gif, sample_tokens
from pipeline.images import ImageData, read_table
from pipeline.sampling_gif import MAX_IMAGES, SamplingFrames
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


def parse_index(spec, n, where):
    """'0-10,15' -> [0, 1, ..., 10, 15]: rows and inclusive ranges of rows, in the order given,
    each in 0..n-1 (n rows in `where`)."""
    rows = []
    for part in str(spec).split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise UserError(f"--index: '{part.strip()}' is not a row or a range of rows "
                            f"(e.g. --index 0-10,15)")
        first, last = int(bounds[0]), int(bounds[-1])
        if first > last:
            raise UserError(f"--index: the range '{part.strip()}' runs backwards")
        if last >= n:
            raise UserError(f"--index: row {last} is out of range: {where} has {n} rows "
                            f"(0..{n - 1})")
        rows.extend(range(first, last + 1))
    return rows


def pick_rows(n, where, index=None, random=None, max_images=8, seed=0):
    """The CSV rows to complete: --index, else --random N (N distinct rows drawn with `seed`,
    in increasing order), else the first max_images."""
    if index is not None and random is not None:
        raise UserError("give --index or --random, not both")
    if index is not None:
        return parse_index(index, n, where)
    if random is not None:
        if not 1 <= random <= n:
            raise UserError(f"--random must be in 1..{n} (the rows of {where}), got {random}")
        return sorted(np.random.default_rng(seed).choice(n, random, replace=False).tolist())
    return list(range(min(max_images, n)))


def complete(run_id, path_to_data, keep="top", offset=None, num_completions=4, max_images=8,
             out_dir=None, seed=0, batch_size=None, device=None, name=None, index=None,
             random=None, gif=False, precision="auto", **settings):
    """Complete images of a CSV `num_completions` times each: the rows `index` ('0-10,15'), or
    `random` rows drawn with `seed`, else the first `max_images`; log the figure and codes to
    the prior run, write PNGs to out_dir; with gif, a GIF of the drawing (completion.gif).
    `settings` are the fields of the prior family's sampling dataclass (priors.sampling_class;
    None: not given); precision: auto | fp32 | bf16 (pipeline/device.py), recorded in
    settings.json. Returns (kept tokens (N, h, w), known mask (N, h, w), completions (N,
    num_completions, h, w), figure PIL image)."""
    if num_completions < 1 or max_images < 1:
        raise UserError("--num_completions and --max_images must be at least 1")
    device = pick_device(device)
    prior = LoadedPrior(run_id, device, precision=precision)
    drawn_with = dataclasses.asdict(priors.sampling_settings(prior.family, settings))
    run_id, tokenizer = prior.run_id, prior.tokenizer()
    table = read_table(path_to_data)
    data = ImageData(table, tokenizer.in_channels, tokenizer.image_size)
    rows = pick_rows(len(data), path_to_data, index, random, max_images, seed)
    count = len(rows)
    images = torch.cat(list(data.ordered(rows, 256))).float() / 255
    tokens = tokenizer.encode(images)  # (N, h, w)
    known_mask = keep_mask(keep, offset, count, tokenizer.grid, tokenizer.values_per_pixel, seed)
    labels = None
    if prior.classes and data.table.labels is not None:  # complete each image as its own class
        labels = prior.class_ids([data.table.labels[r] for r in rows],
                                 f"{path_to_data} {table.label_source}")

    repeat = lambda x: x.repeat_interleave(num_completions, 0) if x is not None else None
    total = count * num_completions
    generator = torch.Generator(device=device).manual_seed(seed)
    # the GIF shows whole rows of completions, at most MAX_IMAGES images
    shown_rows = min(count, max(1, MAX_IMAGES // num_completions))
    frames = SamplingFrames(shown_rows * num_completions) if gif else None
    start = time.perf_counter()
    drawn = sample_tokens(prior.model, total, batch_size or total, repeat(labels), generator,
                          frames, prior.precision, known=repeat(tokens),
                          known_mask=repeat(known_mask),
                          **drawn_with)
    seconds = time.perf_counter() - start
    kept = repeat(known_mask)
    if not torch.equal(drawn[kept], repeat(tokens)[kept]):  # the interface's promise
        raise RuntimeError(f"the {prior.family} prior changed kept tokens")
    print(f"completed {count} images x {num_completions} in {seconds:.2f} s", file=sys.stderr)

    completions = tokenizer.decode(drawn).view(count, num_completions, *images.shape[1:])
    shown = torch.where(tokenizer.known_pixels(known_mask), images, torch.full_like(images, GREY))
    titles = [f"row {r}" for r in rows]
    # (N, 2 + n, C, S, S): the input, n completions, the original
    figure_rows = torch.cat([shown[:, None], completions, images[:, None]], 1)
    figure = image_grid(figure_rows.flatten(0, 1), ncol=num_completions + 2, row_titles=titles)

    name = name or time.strftime("complete-%Y%m%d-%H%M%S")
    tracking.log_image(run_id, figure, "completions", step=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        save_pngs(figure_rows.flatten(0, 1), folder, prefix="row")
        save_png(figure, folder / "figure.png")
        np.save(folder / "codes.npy", drawn.view(count, num_completions, *tokens.shape[1:])
                .numpy().astype(codes_dtype(tokenizer.vocab_size)))
        tracking.log_artifacts(run_id, folder, f"completions/{name}")
    tracking.log_json(run_id, {"csv": str(path_to_data), "keep": keep, "offset": offset,
                               "num_images": count, "num_completions": num_completions,
                               "rows": rows, "index": index, "random": random,
                               "seed": seed, "precision": prior.precision, **drawn_with},
                      f"completions/{name}/settings.json")
    if frames is not None:
        log_gif(frames, tokenizer, None, run_id, f"completions/{name}/completion.gif", out_dir,
                "completions.gif", ncol=num_completions, row_titles=titles[:shown_rows])
    if out_dir:
        out = Path(out_dir)
        save_pngs(completions.flatten(0, 1), out, prefix="completion")
        save_png(figure, out / "completions.png")
        print(f"wrote {total} completions and completions.png to {out}", file=sys.stderr)
    return tokens, known_mask, drawn.view(count, num_completions, *tokens.shape[1:]), figure
