"""Token grids as MLflow artifacts, loaded safely.

`codes/<name>.npy` in a tokenizer run holds integers (N, h, w) in the CSV's row order, and
`codes/<name>.json` what a consumer must check: the vocabulary (`codebook_size`), the grid, the
image size and channels, values per pixel, whether values are ordered, the tokenizer run id,
the CSV's path and content hash, and the labels when there are any (pipeline/tokenizers.py
writes them). Arrays load with `allow_pickle=False`.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import tracking
from core.errors import UserError


def codes_dtype(codebook_size):
    """The smallest integer type that holds codes in [0, codebook_size)."""
    return np.uint8 if codebook_size <= 256 else np.uint16 if codebook_size <= 65536 else np.int32


def check_codes(codes, codebook_size, where, grid=None):
    """Validate an integer array (N, h, w) of codes in [0, codebook_size); -> LongTensor."""
    if codes.ndim != 3:
        raise UserError(f"{where}: expected code grids shaped (N, h, w), got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise UserError(f"{where}: codes must be integers, got {codes.dtype}")
    if grid is not None and tuple(codes.shape[1:]) != tuple(grid):
        raise UserError(f"{where}: code grid {tuple(codes.shape[1:])} does not match the "
                        f"tokenizer's {tuple(grid)}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise UserError(f"{where}: indices out of range: found {codes.min()}..{codes.max()}, "
                        f"the vocabulary has {codebook_size} values (0..{codebook_size - 1})")
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


def pick_artifact(run_id, folder, name, suffix, flag, default="train"):
    """The artifact folder/<name><suffix>. With name None: the only one, else `default` when
    present (the pipeline names the training CSV's codes `train`); several others are an error
    that lists them, rather than a silent pick."""
    available = sorted(Path(p).name[:-len(suffix)] for p in tracking.list_artifacts(run_id, folder)
                       if p.endswith(suffix))
    if not available:
        raise UserError(f"{flag} {run_id}: has no {folder}/*{suffix} artifacts")
    if name is None:
        if len(available) == 1:
            return available[0]
        if default in available:
            return default
        raise UserError(f"{flag} {run_id}: has several {folder}/*{suffix} artifacts "
                        f"({', '.join(available)}); name one")
    if name not in available:
        raise UserError(f"{flag} {run_id}: has no {folder}/{name}{suffix} "
                        f"(available: {', '.join(available)})")
    return name


def load_run_codes(run_id, name=None, flag="--run_id"):
    """A tokenizer run's codes/<name>.npy, validated against its json -> (LongTensor, metadata).
    Metadata written before tokenizers were a family gets the VQ-VAE's defaults."""
    run_id = tracking.resolve_run_id(run_id, flag)
    run = tracking.get_run(run_id, "tokenizer", flag=flag)
    name = pick_artifact(run_id, "codes", name, ".npy", flag)
    meta = tracking.load_json_artifact(run_id, f"codes/{name}.json", flag=flag)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(run_id, f"codes/{name}.npy", tmp, flag=flag)
        array = read_npy(path, f"{flag} {run_id} codes/{name}.npy")
    codes = check_codes(array, meta["codebook_size"], f"{flag} {run_id} codes/{name}.npy",
                        meta["grid"])
    defaults = {"values_per_pixel": 1, "ordered": False, "tokenizer": tracking.stage_of(run)[1],
                "tokenizer_run_id": run_id}
    return codes, {**defaults, **meta, "codes_name": name}
