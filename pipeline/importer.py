"""`python -m pipeline import`: a torchvision download already on disk, as PNGs and CSVs.

    python -m pipeline import --format mnist|fashion_mnist|cifar10 --root DIR --out DIR [--limit N]

reads what `torchvision.datasets.MNIST(root, download=True)` (or FashionMNIST, CIFAR10) left
under DIR, offline, and writes DIR_OUT/train/*.png, DIR_OUT/test/*.png, and DIR_OUT/train.csv
and DIR_OUT/test.csv (image_path, label), ready for `--path_to_data` and `--heldout`:

    mnist, fashion_mnist  <root>/MNIST/raw or <root>/FashionMNIST/raw: the IDX files
                          train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-* (or .gz)
    cifar10               <root>/cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta

Labels are the class names, MNIST's digits as "0".."9". CIFAR-10's batches are Python pickles:
they are read by an unpickler that builds only dicts, lists, strings, bytes and numbers and
refuses everything else (a pickle that names any function or class is not a CIFAR batch), so
no code from the file runs. Everything is written to a temporary folder beside --out and moved
into place at the end: an interrupted import leaves nothing half-written.
"""

import gzip
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UserError

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
FORMATS = ("mnist", "fashion_mnist", "cifar10")


# IDX (MNIST, Fashion-MNIST): a big-endian header, then the bytes

def _open_maybe_gz(folder, name):
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            data = candidate.read_bytes()
            if candidate.suffix == ".gz":
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as e:
                    raise UserError(f"{candidate}: not a readable gzip file ({e})")
            return candidate, data
    raise UserError(f"{folder / name}: not found (nor {name}.gz); is --root the folder given "
                    f"to torchvision with download=True?")


def read_idx(path, data, dims):
    """An IDX array of unsigned bytes with `dims` dimensions -> numpy uint8."""
    if len(data) < 4 + 4 * dims or data[:3] != b"\x00\x00\x08" or data[3] != dims:
        raise UserError(f"{path}: not an IDX file of unsigned bytes with {dims} dimensions")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path}: the header says {shape}, but the file holds {body.size} bytes "
                        f"of data (truncated?)")
    return body.reshape(shape)


def read_idx_split(root, fmt, split):
    folder = Path(root) / IDX_FOLDERS[fmt] / "raw"
    images_path, images = _open_maybe_gz(folder, IDX_FILES[split][0])
    labels_path, labels = _open_maybe_gz(folder, IDX_FILES[split][1])
    images, labels = read_idx(images_path, images, 3), read_idx(labels_path, labels, 1)
    if len(images) != len(labels):
        raise UserError(f"{images_path}: {len(images)} images but {labels_path.name} has "
                        f"{len(labels)} labels")
    names = [str(i) for i in range(10)] if fmt == "mnist" else FASHION_CLASSES
    if labels.max(initial=0) >= len(names):
        raise UserError(f"{labels_path}: label {labels.max()} is not one of the 10 classes")
    return images, [names[i] for i in labels]  # (N, 28, 28) grey


# CIFAR-10: pickled dicts of bytes keys

# what a CIFAR-10 batch names: numpy's rebuilding of a uint8 array (as torch's weights-only
# loader allows it) and, in pickles written by Python 3 at protocol 2, bytes as latin-1 text
SAFE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _DataOnly(pickle.Unpickler):
    """Builds plain data and numpy arrays only: any other global (a class or function the
    file asks to call) is refused."""

    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def read_pickled_dict(path):
    try:
        with open(path, "rb") as f:
            obj = _DataOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a CIFAR-10 batch of plain data ({e})")
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch (a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_split(root, split):
    folder = Path(root) / CIFAR_FOLDER
    meta_path = folder / "batches.meta"
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: not found; is --root the folder given to torchvision "
                        f"with download=True?")
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in read_pickled_dict(meta_path).get("label_names", [])]
    images, labels = [], []
    for name in CIFAR_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path}: not found")
        batch = read_pickled_dict(path)
        data, batch_labels = batch.get("data"), batch.get("labels")
        if isinstance(data, np.ndarray) and data.dtype == np.uint8:
            pixels = data.reshape(-1)
        elif isinstance(data, (bytes, bytearray)):
            pixels = np.frombuffer(data, dtype=np.uint8)
        else:
            raise UserError(f"{path}: its 'data' is not an array of bytes")
        if not isinstance(batch_labels, list):
            raise UserError(f"{path}: no 'labels' list")
        if pixels.size != len(batch_labels) * 3072:
            raise UserError(f"{path}: {pixels.size} bytes of pixels for {len(batch_labels)} "
                            f"labels (expected 3072 each: 3 planes of 32x32)")
        images.append(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        labels.extend(batch_labels)
    if not names or max(labels, default=0) >= len(names):
        raise UserError(f"{meta_path}: its label_names do not cover the labels in the batches")
    return np.concatenate(images), [names[i] for i in labels]


# writing

def write_split(images, labels, out, split):
    """PNGs under out/split/ and out/split.csv; returns the number written."""
    import pandas as pd
    folder = out / split
    folder.mkdir(parents=True)
    width = len(str(len(images)))
    paths = []
    for i, pixels in enumerate(images):
        path = f"{split}/{i:0{width}d}.png"
        Image.fromarray(pixels).save(out / path)
        paths.append(path)
    pd.DataFrame({"image_path": paths, "label": labels}).to_csv(out / f"{split}.csv", index=False)
    return len(paths)


def import_dataset(fmt, root, out, limit=None, progress=True):
    """Convert a torchvision download of `fmt` under `root` into `out`; returns {split: count}."""
    from tqdm import tqdm
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty; give a new --out folder")
    splits = {}
    for split in ("train", "test"):  # read and check everything before writing anything
        images, labels = (read_cifar_split(root, split) if fmt == "cifar10" else
                          read_idx_split(root, fmt, split))
        splits[split] = (images[:limit], labels[:limit])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = {}
        for split, (images, labels) in splits.items():
            bar = tqdm(images, desc=f"{fmt} {split}", unit="img", disable=not progress,
                       file=sys.stderr, dynamic_ncols=True)
            counts[split] = write_split(bar, labels, staging, split)
        if out.exists():
            out.rmdir()  # empty: checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m pipeline import",
        description="Convert a torchvision download already on disk (download=True was run "
                    "before; nothing is fetched) into PNGs with train.csv and test.csv.")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--root", required=True, help="the root folder given to torchvision")
    parser.add_argument("--out", required=True, help="a new folder for the PNGs and CSVs")
    parser.add_argument("--limit", type=int, help="only the first N images of each split")
    args = parser.parse_args(argv)
    counts = import_dataset(args.format, args.root, args.out, args.limit)
    out = Path(args.out)
    print(f"{counts['train']} training and {counts['test']} test images: "
          f"--path_to_data {out / 'train.csv'} --heldout {out / 'test.csv'}")
