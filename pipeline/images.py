"""Image data from a CSV or a folder: validation, decoding, the train/validation split, batching.

A CSV has a column `image_path` (relative to the CSV's folder, or absolute) and optionally
`label`. A folder is read recursively (read_folder): images in first-level subfolders are
labelled with the subfolder's name, as torchvision's ImageFolder reads them. Either way the
result is one ImageTable, and every command reads its data through read_table / read_source.
Images of any format, mode and size become uint8 arrays (C, S, S): converted to RGB or
grayscale, resized so the shorter side is S and center-cropped. Cheap checks (the CSV, the
columns, file existence) run before anything trains; decoding failures name the file and row.
An image whose header claims more than `max_image_pixels()` pixels is refused before any pixel
is decoded (a decompression bomb: a 175 KB PNG can hold 15000x12000 pixels, 180 MB decoded).
"""

import hashlib
import json
import os
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from core.errors import UserError

# what read_folder takes for an image: files PIL reads, by their name's ending (any case)
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}
IN_MEMORY_LIMIT_BYTES = 4 << 30  # decode once and keep in RAM below this; stream above it
# Far above any training image (a 24-megapixel photo is 24e6), below what a small file can make
# a loader allocate; PIPELINE_MAX_IMAGE_PIXELS overrides it.
MAX_IMAGE_PIXELS = 64_000_000
MAX_PIXELS_VARIABLE = "PIPELINE_MAX_IMAGE_PIXELS"


@dataclass
class ImageTable:
    """The images of a CSV or a folder, validated. `rows[i]` is the 0-based place of `paths[i]`:
    its data row in the CSV, or its place in the folder's sorted file list."""
    data_path: Path  # the CSV file, or the folder
    paths: list
    rows: list
    labels: list  # None when the CSV has no `label` column, or the folder no class subfolders
    folder: bool = False  # read from a folder (read_folder) rather than a CSV

    @property
    def label_source(self):
        """Where the labels come from, for messages: the CSV's column or the folder's layout."""
        return "class subfolders" if self.folder else "`label` column"

    def where(self, i):
        if self.folder:
            return str(self.paths[i])
        return f"{self.data_path} row {self.rows[i] + 1} ('{self.paths[i]}')"

    def subset(self, keep):
        return replace(self, paths=[self.paths[i] for i in keep],
                       rows=[self.rows[i] for i in keep],
                       labels=None if self.labels is None else [self.labels[i] for i in keep])


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_table(data_path):
    """Read and validate the images of a CSV or a folder (read_folder). A CSV: the file, its
    columns, and that every image file exists."""
    if Path(data_path).is_dir():
        return read_folder(data_path)
    import pandas as pd
    csv_path = Path(data_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: no such CSV file or folder")
    try:
        frame = pd.read_csv(csv_path)
    except pd.errors.EmptyDataError:
        raise UserError(f"{csv_path}: the CSV is empty")
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{csv_path}: not a readable CSV ({str(e).splitlines()[0]})")
    if "image_path" not in frame.columns:
        raise UserError(f"{csv_path}: no 'image_path' column "
                        f"(columns: {', '.join(map(str, frame.columns)) or 'none'})")
    if len(frame) == 0:
        raise UserError(f"{csv_path}: the CSV has a header but no rows")
    paths, missing = [], []
    for row, value in enumerate(frame["image_path"]):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{csv_path} row {row + 1}: empty image_path")
        path = Path(value.strip())
        path = path if path.is_absolute() else csv_path.parent / path
        paths.append(path)
        if not path.is_file():
            missing.append(row)
    if missing:
        row = missing[0]
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise UserError(f"{csv_path} row {row + 1}: image '{paths[row]}' does not exist{more}")
    labels = None
    if "label" in frame.columns:
        labels = [v.item() if hasattr(v, "item") else v for v in frame["label"]]
    return ImageTable(csv_path, paths, list(range(len(paths))), labels)


def read_folder(folder):
    """A folder of images as a table: every file under it whose name ends in one of
    IMAGE_EXTENSIONS (any case), hidden files and folders (a leading '.') skipped, in the sorted
    order of their paths. torchvision's ImageFolder layout: when the images sit in first-level
    subfolders, each subfolder is a class and labels its images (deeper folders belong to their
    class); a folder with images directly in it and no subfolders of images is unlabelled.
    Images directly in a folder beside class subfolders would have no class: an error.
    Symbolic links to folders are not followed (a link cycle would never end)."""
    folder = Path(folder)
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [(Path(parent) / name).relative_to(folder) for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    if not found:
        raise UserError(f"{folder}: no images in the folder or its subfolders (files ending "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    found.sort(key=lambda relative: relative.parts)
    loose = [relative for relative in found if len(relative.parts) == 1]
    labels = None
    if len(loose) < len(found):  # class subfolders
        if loose:
            classes = sorted({relative.parts[0] for relative in found if len(relative.parts) > 1})
            named = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
            raise UserError(f"{folder}: {len(loose)} image(s) directly in the folder (e.g. "
                            f"'{loose[0]}') beside {len(classes)} class subfolder(s) ({named}); "
                            f"move them into a class subfolder, or out of the folder")
        labels = [relative.parts[0] for relative in found]
    return ImageTable(folder, [folder / relative for relative in found],
                      list(range(len(found))), labels, folder=True)


def folder_sha256(table):
    """SHA-256 of a folder's images (a table from read_folder): each image's path relative to
    the folder, its label and the SHA-256 of its bytes, in order. Renaming an image, moving it
    to another class or editing it changes the digest; the folder's own place, timestamps and
    the files read_folder skips do not."""
    from tqdm import tqdm
    digest = hashlib.sha256()
    labels = table.labels or [None] * len(table.paths)
    for path, label in tqdm(zip(table.paths, labels), total=len(table.paths), unit="img",
                            desc=f"hashing {table.data_path}", leave=False,
                            disable=len(table.paths) < 2000):
        entry = [path.relative_to(table.data_path).as_posix(), label, file_sha256(path)]
        digest.update(json.dumps(entry).encode() + b"\n")
    return digest.hexdigest()


class ImageTooLarge(Exception):
    """An image whose header claims more pixels than max_image_pixels(). Not a ValueError:
    callers that read ValueError as "not base64" or "bad value" must not catch it as such."""


def max_image_pixels():
    """The toolkit's limit on width x height: $PIPELINE_MAX_IMAGE_PIXELS, else MAX_IMAGE_PIXELS."""
    value = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(float(value))  # 2e8 reads as 200,000,000
    except (ValueError, OverflowError):
        limit = 0
    if limit < 1:
        raise UserError(f"${MAX_PIXELS_VARIABLE} must be a positive number of pixels, "
                        f"got '{value}'")
    return limit


_PIL_LIMIT = threading.Lock()  # open_image lifts PIL's global limit for one Image.open


@contextmanager
def open_image(path):
    """`with open_image(path) as img:` Image.open under the toolkit's size limit: ImageTooLarge,
    before any pixel is decoded, when the header's width x height is above max_image_pixels().

    PIL checks its own limit (MAX_IMAGE_PIXELS, 89 MP) inside Image.open, before a caller can see
    the size: with a warning that decode_image used to silence, then an error of its own above
    179 MP. For this header read ours replaces it, so one rule with one message applies; PIL's
    checks of later frames and tiles while decoding stay in force."""
    limit = max_image_pixels()
    with _PIL_LIMIT:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    with img:
        width, height = img.size
        if width * height > limit:
            raise ImageTooLarge(f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels) "
                                f"is above the limit of {limit / 1e6:g} megapixels "
                                f"(${MAX_PIXELS_VARIABLE} sets it)")
        yield img


def detect_channels(table, skip_bad=False):
    """1 when every image is grayscale, else 3. Reads headers only (cheap); returns the table
    without unreadable or too large files when skip_bad, else raises on the first one."""
    modes, keep = set(), []
    for i, path in enumerate(table.paths):
        try:
            with open_image(path) as img:
                modes.add(img.mode)
            keep.append(i)
        except Exception as e:
            _bad_image(table, i, e, skip_bad)
    channels = 1 if modes and modes <= GRAYSCALE_MODES else 3
    return channels, table.subset(keep) if len(keep) < len(table.paths) else table


def image_problem(error):
    """What is wrong with an image, from the exception its decoding raised (one line)."""
    if isinstance(error, ImageTooLarge):
        return f"image too large: {error}"
    return f"cannot read image ({type(error).__name__}: " \
           f"{str(error).splitlines()[0] if str(error) else 'corrupt'})"


def _bad_image(table, i, error, skip_bad):
    message = f"{table.where(i)}: {image_problem(error)}"
    if not skip_bad:
        raise UserError(message)
    print(f"warning: skipping {message}", file=sys.stderr)


def decode_image(path, channels, size):
    """One image file (or file object) -> uint8 array (channels, size, size); ImageTooLarge
    above max_image_pixels()."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PIL's palette-transparency notes
        # but a bomb warning from a later frame or tile fails the image rather than pass unseen
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open_image(path) as img:
            img = ImageOps.exif_transpose(img)
            img = img.convert("L" if channels == 1 else "RGB")
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
            array = np.array(img, dtype=np.uint8)  # a writable copy
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_all(table, channels, size, skip_bad=False, progress=True):
    """Decode every image into one uint8 tensor (N, C, S, S); returns (tensor, kept table)."""
    from tqdm import tqdm
    arrays, keep = [], []
    for i in tqdm(range(len(table.paths)), desc="decoding images", unit="img",
                  disable=not progress or len(table.paths) < 2000, leave=False):
        try:
            arrays.append(decode_image(table.paths[i], channels, size))
            keep.append(i)
        except Exception as e:
            _bad_image(table, i, e, skip_bad)
    if not arrays:
        raise UserError(f"{table.data_path}: no readable images")
    kept = table.subset(keep) if len(keep) < len(table.paths) else table
    return torch.from_numpy(np.stack(arrays)), kept


def local_copies():
    """How many processes on this machine each hold their own in-memory copy of the images:
    torchrun's LOCAL_WORLD_SIZE, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def fits_in_memory(table, channels, size):
    """Whether the decoded uint8 images fit IN_MEMORY_LIMIT_BYTES, shared by every process of
    this machine (under torchrun each rank would hold a full copy: see ImageData)."""
    return len(table.paths) * channels * size * size * local_copies() <= IN_MEMORY_LIMIT_BYTES


def split_indices(n, val_fraction, seed):
    """Deterministic train/validation split of range(n): the same (n, fraction, seed) always
    gives the same rows, so later stages can hold out exactly the rows the tokenizer held out."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class StreamingImages(torch.utils.data.Dataset):
    """Decodes on access, for sets too large for RAM; used with DataLoader workers.

    A bad file must not surface as a worker traceback: __getitem__ reports it as a flag and the
    main process turns it into a one-line error (or skips it)."""

    def __init__(self, table, channels, size):
        self.table, self.channels, self.size = table, channels, size

    def __len__(self):
        return len(self.table.paths)

    def __getitem__(self, i):
        try:
            return torch.from_numpy(decode_image(self.table.paths[i], self.channels, self.size)), i, ""
        except Exception as e:
            blank = torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8)
            return blank, i, image_problem(e)


class ImageData:
    """Images for training and evaluation, in RAM (uint8) when they fit, streamed otherwise.

    Under torchrun a streamed set is read rank by rank: each rank decodes only its slice of
    each global batch (`batches`). An in-memory set is decoded in full on every rank: each
    epoch's order is a fresh permutation of every training row, of which each rank takes a
    slice (so that 1 and N processes make the same updates), so every rank needs every image
    within an epoch; keeping only a fixed shard per rank would train differently. Its size
    therefore counts once per local rank against IN_MEMORY_LIMIT_BYTES (fits_in_memory).

    `batches(indices, batch_size, generator)` yields uint8 (B, C, S, S) batches forever, in a
    random order drawn from `generator` (saved in checkpoints, so a resumed run continues the
    same stream); `ordered(indices, batch_size)` yields each index once, in order."""

    def __init__(self, table, channels, size, skip_bad=False, num_workers=2, force_stream=False):
        self.channels, self.size, self.skip_bad, self.num_workers = \
            channels, size, skip_bad, num_workers
        self.skipped = set()  # streamed: indices into self.table skipped on decoding (skip_bad)
        if fits_in_memory(table, channels, size) and not force_stream:
            self.images, self.table = decode_all(table, channels, size, skip_bad)
        else:
            self.images, self.table = None, table
            self.dataset = StreamingImages(table, channels, size)

    def __len__(self):
        return len(self.table.paths)

    def batches(self, indices, batch_size, generator, rank=0, world_size=1):
        """Under torchrun every rank draws the same order and loads only its slice
        [rank::world_size] of each global batch of `batch_size`."""
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        batch_size = min(batch_size, len(indices) - len(indices) % world_size)
        while True:  # one pass per epoch, dropping the ragged last batch
            order = indices[torch.randperm(len(indices), generator=generator)]
            usable = len(order) - len(order) % batch_size
            mine = order[:usable].view(-1, batch_size)[:, rank::world_size]  # (batches, B/world)
            yield from self._load(mine.flatten().tolist(), batch_size // world_size)

    def ordered(self, indices, batch_size):
        yield from self._load(list(np.asarray(indices).tolist()), batch_size)

    def gather(self, indices, batch_size=512):
        """The images of `indices`, in order, as one uint8 tensor (N, C, S, S), filled batch by
        batch (no list of batches beside it); fewer rows when streamed images are skipped."""
        out = torch.empty((len(indices), self.channels, self.size, self.size), dtype=torch.uint8)
        filled = 0
        for batch in self.ordered(indices, batch_size):
            out[filled:filled + len(batch)] = batch
            filled += len(batch)
        return out[:filled]

    def _load(self, order, batch_size):
        if self.images is not None:
            for start in range(0, len(order), batch_size):
                yield self.images[order[start:start + batch_size]]
            return
        # One loader per pass, so the workers are started once per epoch, not per batch.
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, order),
                                             batch_size=batch_size, num_workers=self.num_workers)
        for images, rows, errors in loader:
            for k, e in enumerate(errors):
                if e:
                    message = f"{self.table.where(int(rows[k]))}: {e}"
                    if not self.skip_bad:
                        raise UserError(message)
                    print(f"warning: skipping {message}", file=sys.stderr)
                    self.skipped.add(int(rows[k]))
            good = [k for k, e in enumerate(errors) if not e]
            if good:
                yield images[good]


class Source:
    """One image CSV or folder, read and validated once, hashed once, and its images decoded
    once per (channels, size): what the one command hands down to every stage, so that none
    reads, hashes or decodes the data again. Splits are computed here, from the decoded images'
    count.

        source = read_source("train.csv")           # or a folder: read_source("photos/")
        data = source.images(1, 16)                  # an ImageData, kept for the next caller
        train_idx, val_idx = source.split(0.1, 0, data)
    """

    def __init__(self, table):
        self.table = table
        self._sha256, self._readable, self._images, self._splits = None, {}, {}, {}

    @property
    def sha256(self):
        """The data's digest, what keys the stages that read it: a CSV's SHA-256, or a folder's
        (folder_sha256). Codes and configs record it as `csv_sha256` either way."""
        if self._sha256 is None:
            self._sha256 = (folder_sha256(self.table) if self.table.folder
                            else file_sha256(self.table.data_path))
        return self._sha256

    def readable(self, skip_bad=False):
        """(channels, table): 1 when every image is grayscale, else 3, and the table less the
        files whose header cannot be read when skip_bad (each named once in a warning; without
        skip_bad the first one is a one-line error). Headers only: see detect_channels."""
        if skip_bad not in self._readable:
            self._readable[skip_bad] = detect_channels(self.table, skip_bad)
        return self._readable[skip_bad]

    def channels(self, skip_bad=False):
        return self.readable(skip_bad)[0]

    def first_size(self, skip_bad=False):
        """The first readable image's shorter side: a default size for tokenizers that keep it."""
        with open_image(self.readable(skip_bad)[1].paths[0]) as first:
            return min(first.size)

    def images(self, channels, size, skip_bad=False, num_workers=2):
        """The ImageData of these images at (channels, size), decoded on the first call only (with
        skip_bad, of the readable rows: see `readable`)."""
        key = (channels, size, skip_bad)
        if key not in self._images:
            table = self.readable(True)[1] if skip_bad else self.table
            self._images[key] = ImageData(table, channels, size, skip_bad, num_workers)
        return self._images[key]

    def split(self, val_fraction, seed, data=None):
        """(train indices, validation indices): split_indices over the images of `data` (rows
        --skip_bad_images dropped are not counted), or over every image of the table; computed
        once per setting, so every stage holds out the same rows."""
        n = len(data) if data is not None else len(self.table.paths)
        if (n, val_fraction, seed) not in self._splits:
            self._splits[n, val_fraction, seed] = split_indices(n, val_fraction, seed)
        return self._splits[n, val_fraction, seed]


def read_source(data_path):
    """read_table(data_path) (a CSV or a folder) as a Source."""
    return Source(read_table(data_path))
