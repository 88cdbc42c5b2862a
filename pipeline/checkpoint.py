"""Checkpoints: written atomically and flushed to disk, loaded without unpickling.

A checkpoint is a plain dict of tensors and Python primitives:
    {"kind": "vqvae" | "pixels" | "prior", "config": {...model config...}, "model": state_dict,
     "optimizer": state_dict, "step": int, "best_val_loss": float, "train": {...settings...},
     "rng": ByteTensor, ...}
so `torch.load(..., weights_only=True)` reads it and it alone rebuilds the model.
"""

import errno
import os
import pickle
import secrets
import shutil
import zipfile
from pathlib import Path

import torch

from core.errors import UserError

NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # a full disk, a full quota


class UnreadableCheckpoint(UserError):
    """A checkpoint file that is torn or not this toolkit's (as opposed to one refused because
    loading it would run code, or one of another kind): a caller may fall back to another."""


def previous_name(path):
    """Where `save_checkpoint(..., keep_previous=True)` keeps the file it replaces:
    last.pt -> last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(checkpoint, path, keep_previous=False):
    """torch.save to a temporary name of this process's own, flushed to disk, then renamed: a
    crash or a second process never leaves a half-written file under `path`. With
    keep_previous the file it replaces is kept as previous_name(path). A write that fails
    (a full disk) removes the temporary file and says, in one line, how much space is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, previous_name(path))
        os.replace(tmp, path)
        _sync_folder(path.parent)  # the renames themselves survive a power cut
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            free = shutil.disk_usage(path.parent).free
            raise UserError(f"could not write the checkpoint {path}: no space left on the "
                            f"device ({free / 2 ** 20:.1f} MiB free in {path.parent}); free "
                            f"some space and resume the run") from None
        raise


def _sync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a folder: the file itself was synced
        pass
    finally:
        os.close(fd)


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
        raise UnreadableCheckpoint(f"{where}: not a readable checkpoint ({type(e).__name__})")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise UnreadableCheckpoint(f"{where}: not a checkpoint of this toolkit (no config/model "
                                   f"entries)")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and checkpoint.get("kind") not in kinds:
        raise UserError(f"{where}: is a '{checkpoint.get('kind')}' checkpoint, expected "
                        f"'{kinds[0]}'")
    return checkpoint
