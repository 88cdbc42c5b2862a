"""`python -m pipeline import`: tiny files in torchvision's on-disk formats become PNGs + CSVs."""

import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT
from core.errors import UserError
from pipeline.importer import import_dataset
from pipeline.images import read_table


def idx_bytes(array):
    """An IDX file of unsigned bytes (MNIST's format): magic 0 0 8 ndim, big-endian sizes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root, folder="MNIST", n=(5, 3), gz=False):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, count in zip(("train", "t10k"), n):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count) % 10
        arrays[prefix] = (images, labels)
        for name, array, dims in ((f"{prefix}-images-idx3-ubyte", images, 3),
                                  (f"{prefix}-labels-idx1-ubyte", labels, 1)):
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
    return arrays


def write_cifar(root, n=4):
    """CIFAR-10's python batches, pickled as Python 3 does at protocol 2: numpy arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f, protocol=2)
    return batches, [n.decode() for n in names]


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_become_pngs_and_csvs(tmp_path, gz):
    arrays = write_mnist(tmp_path / "dl", gz=gz)
    counts = import_dataset("mnist", tmp_path / "dl", tmp_path / "out", progress=False)
    assert counts == {"train": 5, "test": 3}
    table = read_table(tmp_path / "out" / "train.csv")
    assert table.labels == [0, 1, 2, 3, 4]  # digits, read back by pandas as numbers
    first = np.asarray(Image.open(table.paths[2]))
    assert first.shape == (28, 28) and np.array_equal(first, arrays["train"][0][2])
    assert len(read_table(tmp_path / "out" / "test.csv").paths) == 3


def test_fashion_mnist_labels_are_class_names(tmp_path):
    write_mnist(tmp_path / "dl", folder="FashionMNIST")
    import_dataset("fashion_mnist", tmp_path / "dl", tmp_path / "out", limit=2, progress=False)
    frame = pd.read_csv(tmp_path / "out" / "train.csv")
    assert list(frame["label"]) == ["T-shirt/top", "Trouser"]


def test_cifar_batches_are_read_without_running_pickled_code(tmp_path):
    batches, names = write_cifar(tmp_path / "dl")
    counts = import_dataset("cifar10", tmp_path / "dl", tmp_path / "out", progress=False)
    assert counts == {"train": 20, "test": 4}
    frame = pd.read_csv(tmp_path / "out" / "test.csv")
    data, labels = batches["test_batch"]
    assert list(frame["label"]) == [names[i] for i in labels]
    image = np.asarray(Image.open(tmp_path / "out" / frame["image_path"][1]))
    assert image.shape == (32, 32, 3)
    assert np.array_equal(image, data[1].reshape(3, 32, 32).transpose(1, 2, 0))


def test_a_pickle_that_asks_to_run_code_is_refused_and_nothing_is_written(tmp_path):
    write_cifar(tmp_path / "dl")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    with open(tmp_path / "dl" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f, protocol=2)
    with pytest.raises(UserError, match=r"data_batch_3: not a CIFAR-10 batch.*refused"):
        import_dataset("cifar10", tmp_path / "dl", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "dl"]  # no staging folder left behind


def test_the_command_names_a_missing_or_truncated_file_in_one_line(tmp_path):
    arrays = write_mnist(tmp_path / "dl")
    images = tmp_path / "dl" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(idx_bytes(arrays["t10k"][0])[:-10])
    command = [sys.executable, "-m", "pipeline", "import", "--format", "mnist",
               "--root", str(tmp_path / "dl"), "--out", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {images}: the header says (3, 28, 28), but the file holds 2342 bytes of data "
        f"(truncated?)"]
    result = subprocess.run(command[:-4] + ["--root", str(tmp_path / "nowhere"), "--out",
                                            str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "not found" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
