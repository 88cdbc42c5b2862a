"""Tokenizer runs, whatever their kind: load one by run id, encode a CSV into codes, fit one.

A tokenizer run (stage `tokenizer`, tag `pipeline.tokenizer` = its kind) holds its
`config.json`, a checkpoint that rebuilds it (`checkpoints/best.pt`: {"kind", "config", "model",
...}, read by image_tokenizers.from_checkpoint), and `codes/<name>.npy` + `.json` for every
data set it encoded. Nothing here asks which kind a tokenizer is: it calls the interface of
image_tokenizers/base.py. Kinds trained by steps are trained by pipeline/train_tokenizer.py;
fitted kinds by `fit_tokenizer` below.
"""

import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import image_tokenizers
from core.config import build, field
from core.errors import UserError
from pipeline import describe, tracking
from pipeline.checkpoint import save_checkpoint
from pipeline.codes import codes_dtype
from pipeline.device import autocast, pick_device, resolve_precision
from pipeline.images import read_source
from pipeline.progress import progress_bar
from pipeline.runs import load_run_checkpoint

STAGE = "tokenizer"


class RunTokenizer:
    """A tokenizer model (any kind) on `device`, with the run it came from: its interface in
    batches, results on the CPU. `pixel_quantiles` (C, tone.KNOTS): the training images'
    pixel quantiles, where the run recorded them (what tone matching sends samples to).
    `precision` (resolved, pipeline/device.py): encode and decode run under its autocast; the
    VQ-VAE's codebook distances stay fp32 (vqvae/quantizer.py), decoded images come out fp32."""

    def __init__(self, model, run_id, device, pixel_quantiles=None, step=0, precision="fp32"):
        self.model, self.run_id, self.device = model.to(device), run_id, device
        self.precision = precision
        self.pixel_quantiles, self.step = pixel_quantiles, step  # step: the checkpoint's
        self.kind = model.kind
        self.vocab_size, self.grid = model.vocab_size, tuple(model.grid)
        self.values_per_pixel, self.ordered = model.values_per_pixel, model.ordered
        self.image_size, self.in_channels = model.image_size, model.in_channels
        self.image_dims = model.image_dims

    def codes_meta(self):
        """What a consumer of this tokenizer's codes must check (written beside each .npy)."""
        return {"codebook_size": self.vocab_size, "grid": list(self.grid),
                "image_size": self.image_size, "in_channels": self.in_channels,
                "values_per_pixel": self.values_per_pixel, "ordered": self.ordered,
                "tokenizer": self.kind, "tokenizer_run_id": self.run_id}

    @torch.no_grad()
    def encode(self, images, batch_size=256):
        """(N, C, S, S) floats in [0, 1] -> (N, h, w) LongTensor on the CPU."""
        with autocast(self.device, self.precision):
            return torch.cat([self.model.encode(images[i:i + batch_size].to(self.device).float())
                              .cpu() for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def decode(self, tokens, batch_size=256):
        """(N, h, w) tokens -> (N, C, S', S') floats in [0, 1] on the CPU (S' > S for a grid
        larger than the tokenizer's)."""
        out = []
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size].to(self.device).long()
            with autocast(self.device, self.precision):
                out.append(self.model.decode(batch).float().cpu())
        return torch.cat(out)

    def reconstruct(self, images):
        """decode(encode(images)): what a perfect prior over these codes would give back."""
        return self.decode(self.encode(images))

    def known_pixels(self, known):
        return self.model.known_pixels(known)


def tokenizer_from_checkpoint(checkpoint, device, run_id=None, precision="fp32"):
    """A RunTokenizer from a loaded checkpoint dict (any registered kind); precision resolved."""
    return RunTokenizer(image_tokenizers.from_checkpoint(checkpoint), run_id, device,
                        checkpoint.get("pixel_quantiles"), checkpoint.get("step", 0), precision)


def load_tokenizer(run_id, device=None, flag="--run_id", precision="auto"):
    """The tokenizer of a tokenizer run (a run id or a models:/ URI naming one), weights
    loaded weights-only: a RunTokenizer running in `precision` (auto | fp32 | bf16, resolved
    for the device; or an already resolved one)."""
    run_id = tracking.resolve_run_id(run_id, flag)
    tracking.get_run(run_id, STAGE, flag=flag)
    device = pick_device(device) if not isinstance(device, torch.device) else device
    checkpoint = load_run_checkpoint(run_id, STAGE, tuple(image_tokenizers.KINDS), flag=flag)
    return tokenizer_from_checkpoint(checkpoint, device, run_id,
                                     resolve_precision(precision, device))


def log_codes(tokenizer, source, data, name, batch_size=256, progress=True):
    """Encode every image of `data` (an ImageData of `source`'s CSV) and log codes/<name>.npy
    (rows in CSV order) + .json to the tokenizer's run. Images go through the tokenizer
    `batch_size` at a time, from uint8 to floats per batch, into one preallocated array of the
    vocabulary's integer type: memory is the codes plus one batch, not the split as floats.
    progress: a bar (pipeline/progress.py) while encoding."""
    codes, filled = None, 0
    with progress_bar(len(data), "quantizing", "img", progress) as bar:
        for batch in data.ordered(range(len(data)), batch_size):
            batch_codes = tokenizer.encode(batch.float() / 255, batch_size).numpy()  # (B, h, w)
            if codes is None:
                codes = np.empty((len(data), *batch_codes.shape[1:]),
                                 codes_dtype(tokenizer.vocab_size))
            codes[filled:filled + len(batch_codes)] = batch_codes
            filled += len(batch_codes)
            bar.update(len(batch_codes))
    if codes is None:
        raise UserError(f"{source.table.data_path}: no readable images")
    encoded = data.table
    if filled < len(data):  # a streamed set skipped images that failed to decode (skip_bad)
        codes = codes[:filled]
        encoded = encoded.subset([i for i in range(len(data)) if i not in data.skipped])
    table = source.table
    meta = {**tokenizer.codes_meta(), "csv_path": str(Path(table.data_path).resolve()),
            "csv_sha256": source.sha256, "num_images": int(codes.shape[0]),
            "rows": encoded.rows if len(encoded.rows) < len(table.rows) else None,
            "labels": encoded.labels, "precision": tokenizer.precision}
    # The .json goes first: consumers find codes by their .npy, which must never lack its json.
    tracking.log_json(tokenizer.run_id, meta, f"codes/{name}.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.npy"
        np.save(path, codes)
        tracking.log_artifact(tokenizer.run_id, path, "codes")
    print(f"encoded {codes.shape[0]} images -> codes/{name}.npy {tuple(codes.shape)} "
          f"in run {tokenizer.run_id}", file=sys.stderr)
    return codes


def quantize(run_id, path_to_data=None, name=None, batch_size=256, device=None, source=None,
             precision="auto", progress=True):
    """Encode a CSV's images with a tokenizer run and log codes/<name>.npy and .json into it.
    `source`: the CSV already read (images.read_source), so it is not read again. The codes'
    .json records the precision they were encoded in. progress: a bar while encoding."""
    tokenizer = load_tokenizer(run_id, device, precision=precision)
    run_id = tokenizer.run_id
    recorded = tracking.load_json_artifact(run_id, "config.json")
    source = source or read_source(path_to_data or recorded["train"]["path_to_data"])
    skip_bad = bool(recorded["train"].get("skip_bad_images", False))
    data = source.images(tokenizer.in_channels, tokenizer.image_size, skip_bad)
    log_codes(tokenizer, source, data, name or Path(source.table.data_path).stem, batch_size,
              progress)
    return run_id


# fitted kinds

@dataclass
class FitConfig:
    path_to_data: str = field("", "CSV with an image_path column (and optionally label), or "
                                  "a folder of images (class subfolders label them)")
    in_channels: Optional[int] = field(None, "1 (grayscale) or 3 (RGB); detected when unset")
    val_fraction: float = field(0.1, "fraction of rows held out: fitting sees the rest only")
    seed: int = field(0, "seed for the split and the fit")
    skip_bad_images: bool = field(False, "skip unreadable images with a warning instead of "
                                         "failing")
    experiment: Optional[str] = field(None, "MLflow experiment (default: "
                                            "$MLFLOW_EXPERIMENT_NAME)")


def fit_tokenizer(kind, model_flags=None, fit_flags=None, parent_run_id=None, tags=None,
                  source=None, codes_name=None):
    """Create a run for a fitted tokenizer kind (image_tokenizers/base.py): fit it on the
    training split's images, log its checkpoint and the CSV's codes (codes/<codes_name>.npy,
    default: the CSV's stem); return the run id. `source`: the CSV already read
    (images.read_source)."""
    module = image_tokenizers.kind(kind)
    if not module.Model.fitted:
        raise UserError(f"the {kind} tokenizer is trained by steps (train_vqvae.py), not fitted")
    fit = build(FitConfig, fit_flags or {})
    if not fit.path_to_data:
        raise UserError("--path_to_data is required (a CSV with an image_path column, or a "
                        "folder of images)")
    source = source or read_source(fit.path_to_data)
    geometry = {"in_channels": fit.in_channels or source.channels(fit.skip_bad_images),
                "image_size": (model_flags or {}).get("image_size")
                or source.first_size(fit.skip_bad_images)}
    config = build(module.Config, model_flags or {}, geometry)
    config.validate()
    data = source.images(config.in_channels, config.image_size, fit.skip_bad_images)
    train_idx, val_idx = source.split(fit.val_fraction, fit.seed, data)
    model = module.Model.fit(config, torch.cat(list(data.ordered(train_idx, 512))).float() / 255,
                             seed=fit.seed)
    name = model.run_name()
    flags = {**(fit_flags or {}), **(model_flags or {})}
    note = describe.description(
        f"Tokenizer `{kind}`, fitted: {config.image_size}x{config.image_size} images -> "
        f"{model.grid[0]}x{model.grid[1]} grids of {model.vocab_size} token values",
        command=describe.script_command("quantize_dataset.py", {"tokenizer": kind}, flags),
        started_by=describe.process_command(),
        data=f"`{fit.path_to_data}` (SHA-256 `{source.sha256[:12]}...`): {len(train_idx):,} "
             f"images fitted on, {len(val_idx):,} held out (val_fraction {fit.val_fraction}, "
             f"seed {fit.seed}); both under *Datasets*",
        artifacts={"config.json": "every setting, and the CSV's SHA-256",
                   "checkpoints/best.pt": "weights-only checkpoint that rebuilds the tokenizer",
                   "<name>.npy": "what was fitted, as arrays (a palette's colours)",
                   "codes/<name>.npy, .json": "code grids (N, h, w) of each CSV it encoded"})
    run_id = tracking.create_run(STAGE, fit.experiment, run_name=name, tags=describe.source_tags(
        {tracking.TOKENIZER_TAG: kind, describe.NOTE_TAG: note, **(tags or {})}),
        parent_run_id=parent_run_id)
    status = "FAILED"
    try:
        tracking.log_params(run_id, describe.run_params(
            asdict(fit), asdict(config), {"vocab_size": model.vocab_size,
                                          "num_images": len(data)}))
        describe.log_inputs(run_id, describe.csv_inputs(
            source.table.data_path, source.sha256, {"training": train_idx, "validation": val_idx},
            ["image_path"] + (["label"] if source.table.labels else [])))
        tracking.log_json(run_id, {"model": asdict(config), "train": asdict(fit),
                                   "data": {"csv_sha256": source.sha256,
                                            "num_images": len(data)}}, "config.json")
        checkpoint = {"kind": kind, "config": asdict(config), "model": model.state_dict(),
                      "step": 0, "run_id": run_id}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(checkpoint, Path(tmp) / "best.pt")
            tracking.log_artifact(run_id, Path(tmp) / "best.pt", "checkpoints")
            for buffer, value in model.named_buffers():  # what was fitted (a palette),
                np.save(Path(tmp) / f"{buffer}.npy", value.numpy())  # readable without torch
                tracking.log_artifact(run_id, Path(tmp) / f"{buffer}.npy")
        tokenizer = RunTokenizer(model, run_id, torch.device("cpu"))
        log_codes(tokenizer, source, data, codes_name or Path(fit.path_to_data).stem)
        status = "FINISHED"
    finally:
        tracking.end_run(run_id, status)
    return run_id
