"""Code grids as MLflow artifacts: quantizing a data set, and loading codes safely.

`codes/<name>.npy` in a VQ-VAE run holds integers (N, h, w) in the CSV's row order, and
`codes/<name>.json` what a consumer must check: the codebook size, the grid, the image size and
channels, the VQ-VAE run id, the CSV's path and content hash, and the labels when there are any.
Arrays load with `allow_pickle=False`.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import tracking
from pipeline.device import pick_device
from pipeline.errors import UserError
from pipeline.images import ImageData, file_sha256, read_table
from pipeline.runs import load_run_checkpoint


def codes_dtype(codebook_size):
    return np.uint16 if codebook_size <= 65536 else np.int32


def check_codes(codes, codebook_size, where, grid=None):
    """Validate an integer array (N, h, w) of codes in [0, codebook_size); -> LongTensor."""
    if codes.ndim != 3:
        raise UserError(f"{where}: expected code grids shaped (N, h, w), got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise UserError(f"{where}: codes must be integers, got {codes.dtype}")
    if grid is not None and tuple(codes.shape[1:]) != tuple(grid):
        raise UserError(f"{where}: code grid {tuple(codes.shape[1:])} does not match the "
                        f"VQ-VAE's {tuple(grid)}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise UserError(f"{where}: indices out of range: found {codes.min()}..{codes.max()}, "
                        f"the codebook has {codebook_size} codes (0..{codebook_size - 1})")
    return torch.from_numpy(codes.astype(np.int64))


def read_npy(path, where=None):
    """np.load without unpickling; a one-line UserError for anything else."""
    where = where or str(path)
    if not Path(path).is_file():
        raise UserError(f"{where}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise UserError(f"{where}: refused to load ({str(e).splitlines()[0]})")
    except (OSError, EOFError) as e:
        raise UserError(f"{where}: not a readable .npy file ({type(e).__name__})")


def load_codes_file(path, codebook_size, grid=None):
    return check_codes(read_npy(path), codebook_size, str(path), grid)


def pick_artifact(run_id, folder, name, suffix, flag):
    """The artifact folder/<name><suffix>; with name None, the only (or latest-named) one."""
    available = sorted(Path(p).name[:-len(suffix)] for p in tracking.list_artifacts(run_id, folder)
                       if p.endswith(suffix))
    if not available:
        raise UserError(f"{flag} {run_id}: has no {folder}/*{suffix} artifacts")
    if name is None:
        return available[-1]
    if name not in available:
        raise UserError(f"{flag} {run_id}: has no {folder}/{name}{suffix} "
                        f"(available: {', '.join(available)})")
    return name


def load_run_codes(run_id, name=None, flag="--run_id"):
    """A VQ-VAE run's codes/<name>.npy, validated against its json -> (LongTensor, metadata)."""
    tracking.get_run(run_id, "vqvae", flag=flag)
    name = pick_artifact(run_id, "codes", name, ".npy", flag)
    meta = tracking.load_json_artifact(run_id, f"codes/{name}.json", flag=flag)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(run_id, f"codes/{name}.npy", tmp, flag=flag)
        array = read_npy(path, f"{flag} {run_id} codes/{name}.npy")
    codes = check_codes(array, meta["codebook_size"], f"{flag} {run_id} codes/{name}.npy",
                        meta["grid"])
    return codes, {**meta, "codes_name": name}


def quantize(run_id, path_to_data=None, name=None, batch_size=256, device=None):
    """Encode a CSV's images with a VQ-VAE run and log codes/<name>.npy and .json into it."""
    checkpoint = load_run_checkpoint(run_id, "vqvae", "vqvae")
    from vqvae.model import vqvae_from_checkpoint
    model = vqvae_from_checkpoint(checkpoint)
    config = model.config
    recorded = tracking.load_json_artifact(run_id, "config.json")
    csv_path = path_to_data or recorded["train"]["path_to_data"]
    table = read_table(csv_path)
    skip_bad = bool(recorded["train"].get("skip_bad_images", False))
    data = ImageData(table, config.in_channels, config.image_size, skip_bad)
    device = pick_device(device)
    model.to(device)
    chunks = [model.encode_to_indices(batch.to(device).float() / 255).cpu()
              for batch in data.ordered(range(len(data)), batch_size)]
    codes = torch.cat(chunks).numpy().astype(codes_dtype(config.codebook_size))
    name = name or Path(csv_path).stem
    meta = {"codebook_size": config.codebook_size, "grid": [config.grid_size, config.grid_size],
            "image_size": config.image_size, "in_channels": config.in_channels,
            "vqvae_run_id": run_id, "csv_path": str(Path(csv_path).resolve()),
            "csv_sha256": file_sha256(csv_path), "num_images": int(codes.shape[0]),
            "rows": data.table.rows if len(data.table.rows) < len(table.rows) else None,
            "labels": data.table.labels}
    # The .json goes first: consumers find codes by their .npy, which must never lack its json.
    tracking.log_json(run_id, meta, f"codes/{name}.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.npy"
        np.save(path, codes)
        tracking.log_artifact(run_id, path, "codes")
    print(f"quantized {codes.shape[0]} images -> codes/{name}.npy {tuple(codes.shape)}",
          file=sys.stderr)
    return run_id
