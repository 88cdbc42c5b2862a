"""Shared fixtures: an MLflow store in a temporary folder, synthetic images, a tiny trained chain.

Every test runs on the CPU with tiny configs. The store (sqlite + local artifacts) lives in a
session temp folder that is also the working directory, so nothing touches the user's mlflow.db.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TINY_VQVAE = ["--image_size", "16", "--channels", "16", "--downsample", "4",
              "--codebook_size", "16", "--code_dim", "8", "--n_res_blocks", "1",
              "--batch_size", "16", "--learning_rate", "3e-3"]
# Logging the served MLflow Model takes seconds; tests/test_serving.py covers it, the others
# skip it.
TINY_PRIOR = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "16",
              "--dropout", "0.0", "--no-log_model"]


def make_images(folder, n=48, size=16, mode="L", seed=0):
    """Synthetic images: a bright rectangle at a random place on a dark background, plus noise.
    Simple enough that a tiny VQ-VAE learns them in a few dozen steps."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        pixels = rng.integers(0, 30, (size, size)).astype(np.uint8)
        r, c = rng.integers(0, size // 2, 2)
        pixels[r:r + size // 2, c:c + size // 3] = 220
        image = Image.fromarray(pixels, "L")
        if mode != "L":
            image = image.convert(mode)
        name = f"img_{i:03d}.png"
        image.save(folder / name)
        names.append(name)
    return names


def write_csv(path, rows, header="image_path,label"):
    path = Path(path)
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def labelled_csv(folder, n, seed, name="train.csv"):
    """make_images in folder/imgs, listed in folder/name with two classes in turn (0, 1, 0, ...)."""
    names = make_images(Path(folder) / "imgs", n=n, seed=seed)
    return write_csv(Path(folder) / name, [f"imgs/{n},{i % 2}" for i, n in enumerate(names)])


@pytest.fixture(scope="session", autouse=True)
def cpu_without_bf16_units():
    """--precision auto resolves to fp32 in this process, as on a CPU without bf16 units: the
    suite computes the same on every CI machine, and its tiny models would only pay bf16's
    per-call costs. tests/test_precision.py pretends other CPUs where it checks bf16."""
    from pipeline import device
    real = device.cpu_flags
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(device, "cpu_flags", lambda: real() - set(device.BF16_CPU_FLAGS))
        yield


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A fresh sqlite tracking store for the test session (also the working directory)."""
    folder = tmp_path_factory.mktemp("mlflow_store")
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    from pipeline import tracking
    tracking.reset_client()
    yield folder
    os.chdir(old_cwd)
    if old_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_uri
    tracking.reset_client()


@pytest.fixture(scope="session")
def image_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    names = make_images(folder / "imgs", n=48)
    return write_csv(folder / "train.csv", [f"imgs/{n},{i % 3}" for i, n in enumerate(names)])


def run_main(main, argv, capsys=None):
    """Run a script's main(argv) in-process; return the run id from its last stdout line."""
    import io
    import contextlib
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("run_id="), out.getvalue()
    return last.split("=", 1)[1]


@pytest.fixture(scope="session")
def chain(store, image_csv):
    """A tiny VQ-VAE -> codes -> prior -> generated samples chain, trained once per session."""
    import train_vqvae, quantize_dataset, train as train_prior_script, transformer_generation
    vqvae_run = run_main(train_vqvae.main, ["--path_to_data", str(image_csv), "--max_steps", "80",
                                            "--eval_every", "40", "--checkpoint_every", "40",
                                            "--seed", "0", *TINY_VQVAE])
    run_main(quantize_dataset.main, ["--run_id", vqvae_run])
    prior_run = run_main(train_prior_script.main, ["--run_id", vqvae_run, "--max_steps", "30",
                                                   "--eval_every", "15", *TINY_PRIOR])
    run_main(transformer_generation.main, ["--run_id", prior_run, "--num_samples", "6",
                                           "--name", "first", "--no_decode"])
    return {"vqvae": vqvae_run, "prior": prior_run, "csv": image_csv}
