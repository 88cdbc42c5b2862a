"""Checkpoints: written atomically, loaded without unpickling.

A checkpoint is a plain dict of tensors and Python primitives:
    {"kind": "vqvae" | "pixels" | "prior", "config": {...model config...}, "model": state_dict,
     "optimizer": state_dict, "step": int, "best_val_loss": float, "train": {...settings...},
     "rng": ByteTensor, ...}
so `torch.load(..., weights_only=True)` reads it and it alone rebuilds the model.
"""

import os
import pickle
import zipfile
from pathlib import Path

import torch

from core.errors import UserError


def save_checkpoint(checkpoint, path):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind=None, where=None):
    """Load a checkpoint with weights_only=True; refuse anything that would need unpickling.

    `where` names the checkpoint in error messages (e.g. "run abc123 checkpoints/best.pt").
    """
    where = where or str(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; name only what the file asked to run.
        asks = [line.strip() for line in str(e).splitlines()
                if "GLOBAL" in line or "global" in line.split(":")[0]]
        raise UserError(f"{where}: refused to load, it is not a plain weights checkpoint "
                        f"(loading it would run pickled code)" + (f": {asks[0]}" if asks else ""))
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{where}: not a readable checkpoint ({type(e).__name__})")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise UserError(f"{where}: not a checkpoint of this toolkit (no config/model entries)")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and checkpoint.get("kind") not in kinds:
        raise UserError(f"{where}: is a '{checkpoint.get('kind')}' checkpoint, expected "
                        f"'{kinds[0]}'")
    return checkpoint
