"""Tokenizer runs, whatever their kind: load one by run id, encode a CSV into codes, decode.

A tokenizer run (stage `tokenizer`, tag `pipeline.tokenizer` = vqvae | pixels) holds its
`config.json`, a checkpoint that rebuilds it (`checkpoints/best.pt`: the VQ-VAE's weights, or
the pixel tokenizer's config and palette), and `codes/<name>.npy` + `.json` for every data set
it encoded. Priors and generation see only the `Tokenizer` below: vocabulary, grid, image
geometry, and the verbs encode / decode.
"""

import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import tracking
from pipeline.codes import codes_dtype
from pipeline.device import autocast, pick_device
from pipeline.images import ImageData, detect_channels, file_sha256, read_table, split_indices
from pipeline.runs import load_run_checkpoint


class Tokenizer:
    """A loaded tokenizer: `model` is a VQVAE or a PixelTokenizer, on `device`."""

    def __init__(self, kind, run_id, model, device):
        self.kind, self.run_id, self.model, self.device = kind, run_id, model.to(device), device
        config = model.config
        if kind == "vqvae":
            self.vocab_size, self.grid = config.codebook_size, (config.grid_size,) * 2
            self.values_per_pixel, self.ordered = 1, False
        else:
            self.vocab_size, self.grid = config.vocab_size, config.grid
            self.values_per_pixel, self.ordered = config.values_per_pixel, config.mode == "levels"
        self.image_size, self.in_channels = config.image_size, config.in_channels
        self.pixel_quantiles = None  # (C, tone.KNOTS): the training images', where recorded

    @property
    def image_dims(self):
        """Dimensions of one image (pixels x channels): bits/dim are per these."""
        return self.image_size ** 2 * self.in_channels

    def codes_meta(self):
        """What a consumer of this tokenizer's codes must check (written beside each .npy)."""
        return {"codebook_size": self.vocab_size, "grid": list(self.grid),
                "image_size": self.image_size, "in_channels": self.in_channels,
                "values_per_pixel": self.values_per_pixel, "ordered": self.ordered,
                "tokenizer": self.kind, "tokenizer_run_id": self.run_id}

    @torch.no_grad()
    def encode(self, images, batch_size=256):
        """(N, C, S, S) floats in [0, 1] -> (N, h, w) LongTensor on the CPU."""
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(self.device).float()
            if self.kind == "vqvae":
                chunks.append(self.model.encode_to_indices(batch).cpu())
            else:
                chunks.append(self.model.encode(batch).cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def decode(self, tokens, batch_size=256):
        """(N, h, w) tokens -> (N, C, S', S') floats in [0, 1] on the CPU (S' > S for a grid
        larger than the tokenizer's: both kinds decode any grid)."""
        out = []
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size].to(self.device).long()
            if self.kind == "vqvae":
                with autocast(self.device):
                    out.append(self.model.decode_indices(batch).float().cpu())
            else:
                out.append(self.model.decode(batch).cpu())
        return torch.cat(out)

    def known_pixels(self, known):
        """(N, h, w) bool, True for known tokens -> (N, 1, S, S) bool, True for pixels that the
        known tokens determine (a VQ code covers a downsample x downsample block)."""
        if self.kind == "vqvae":
            factor = self.model.config.downsample
            return known.repeat_interleave(factor, 1).repeat_interleave(factor, 2)[:, None]
        return self.model.known_pixels(known)


def tokenizer_from_checkpoint(checkpoint, device, run_id=None):
    """A Tokenizer from a loaded checkpoint dict (kind `vqvae` or `pixels`)."""
    if checkpoint["kind"] == "vqvae":
        from vqvae.model import vqvae_from_checkpoint
        tokenizer = Tokenizer("vqvae", run_id, vqvae_from_checkpoint(checkpoint), device)
        tokenizer.pixel_quantiles = checkpoint.get("pixel_quantiles")  # runs since tone matching
        return tokenizer
    from pixels.tokenizer import pixels_from_checkpoint
    return Tokenizer("pixels", run_id, pixels_from_checkpoint(checkpoint), device)


def load_tokenizer(run_id, device=None, flag="--run_id"):
    """The tokenizer of a tokenizer run (either kind; a run id or a models:/ URI naming one),
    weights loaded weights-only."""
    run_id = tracking.resolve_run_id(run_id, flag)
    tracking.get_run(run_id, "tokenizer", flag=flag)
    device = pick_device(device) if not isinstance(device, torch.device) else device
    checkpoint = load_run_checkpoint(run_id, "tokenizer", ("vqvae", "pixels"), flag=flag)
    return tokenizer_from_checkpoint(checkpoint, device, run_id)


def log_codes(tokenizer, table, data, name):
    """Encode every image of `data` and log codes/<name>.npy (rows in CSV order) + .json."""
    images = torch.cat(list(data.ordered(range(len(data)), 512))).float() / 255
    codes = tokenizer.encode(images).numpy().astype(codes_dtype(tokenizer.vocab_size))
    meta = {**tokenizer.codes_meta(), "csv_path": str(Path(table.csv_path).resolve()),
            "csv_sha256": file_sha256(table.csv_path), "num_images": int(codes.shape[0]),
            "rows": data.table.rows if len(data.table.rows) < len(table.rows) else None,
            "labels": data.table.labels}
    if tokenizer.kind == "vqvae":
        meta["vqvae_run_id"] = tokenizer.run_id  # read by versions before the families
    # The .json goes first: consumers find codes by their .npy, which must never lack its json.
    tracking.log_json(tokenizer.run_id, meta, f"codes/{name}.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.npy"
        np.save(path, codes)
        tracking.log_artifact(tokenizer.run_id, path, "codes")
    print(f"encoded {codes.shape[0]} images -> codes/{name}.npy {tuple(codes.shape)} "
          f"in run {tokenizer.run_id}", file=sys.stderr)
    return codes


def quantize(run_id, path_to_data=None, name=None, batch_size=256, device=None):
    """Encode a CSV's images with a tokenizer run and log codes/<name>.npy and .json into it."""
    tokenizer = load_tokenizer(run_id, device)
    run_id = tokenizer.run_id
    recorded = tracking.load_json_artifact(run_id, "config.json")
    csv_path = path_to_data or recorded["train"]["path_to_data"]
    table = read_table(csv_path)
    skip_bad = bool(recorded["train"].get("skip_bad_images", False))
    data = ImageData(table, tokenizer.in_channels, tokenizer.image_size, skip_bad)
    log_codes(tokenizer, table, data, name or Path(csv_path).stem)
    return run_id


def create_pixels_tokenizer(path_to_data, mode="levels", bits=4, palette_size=16,
                            image_size=None, in_channels=None, name=None, experiment=None,
                            val_fraction=0.1, seed=0, skip_bad_images=False, max_fit_pixels=200_000,
                            parent_run_id=None, tags=None):
    """Create a `pixels` tokenizer run for a CSV (fitting the palette on the training split's
    pixels in `palette` mode), encode the CSV into it; return the run id."""
    from pixels.tokenizer import PixelsConfig, PixelTokenizer, kmeans_palette
    table = read_table(path_to_data)
    if in_channels is None:
        in_channels, table = detect_channels(table, skip_bad_images)
    if image_size is None:
        from PIL import Image
        with Image.open(table.paths[0]) as first:
            image_size = min(first.size)
    config = PixelsConfig(mode, bits, palette_size, image_size, in_channels)
    config.validate()
    data = ImageData(table, in_channels, image_size, skip_bad_images)
    train_idx, _ = split_indices(len(data), val_fraction, seed)
    palette = None
    if mode == "palette":  # fitted on the training split only, as a prior's split will be
        images = torch.cat(list(data.ordered(train_idx, 512))).float() / 255
        pixels = images.permute(0, 2, 3, 1).reshape(-1, in_channels)
        pick = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))
        palette = kmeans_palette(pixels[pick[:max_fit_pixels]], palette_size, seed=seed)
    model = PixelTokenizer(config, palette)
    train = {"path_to_data": str(path_to_data), "val_fraction": val_fraction, "seed": seed,
             "skip_bad_images": skip_bad_images, "experiment": experiment}
    run_id = tracking.create_run("tokenizer", experiment, run_name=name,
                                 tags={tracking.TOKENIZER_TAG: "pixels", **(tags or {})},
                                 parent_run_id=parent_run_id)
    status = "FAILED"
    try:
        tracking.log_params(run_id, {**asdict(config), "vocab_size": config.vocab_size,
                                     "num_images": len(data)})
        tracking.log_json(run_id, {"model": asdict(config), "train": train}, "config.json")
        checkpoint = {"kind": "pixels", "config": asdict(config), "model": model.state_dict(),
                      "step": 0, "run_id": run_id}
        with tempfile.TemporaryDirectory() as tmp:
            from pipeline.checkpoint import save_checkpoint
            save_checkpoint(checkpoint, Path(tmp) / "best.pt")
            tracking.log_artifact(run_id, Path(tmp) / "best.pt", "checkpoints")
            if palette is not None:
                np.save(Path(tmp) / "palette.npy", palette.numpy())
                tracking.log_artifact(run_id, Path(tmp) / "palette.npy")
        tokenizer = Tokenizer("pixels", run_id, model, torch.device("cpu"))
        log_codes(tokenizer, table, data, Path(path_to_data).stem)
        status = "FINISHED"
    finally:
        tracking.end_run(run_id, status)
    return run_id
