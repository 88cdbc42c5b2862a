"""Faults of the data (issue 23, items 7 and 8): decompression bombs, and peak memory against
the data's size.

    python -m benchmarks.fault_memory                        # both tables, in a temp folder
    python -m benchmarks.fault_memory --baseline /tmp/oldmem # and the peaks of another checkout

`cases(workdir)`: a VQ-VAE training on a CSV that holds a PNG bomb (about 175 KB on disk whose
header claims 15000x12000, or 12000x12000, grey pixels), as a user runs it: refused in one line,
or skipped with --skip_bad_images. Each row: {"case", "outcome", "lost", "recover_s"}
(recover_s: seconds until the process ended, with the error or the finished run).

`memory(workdir)`: the peak resident memory of quantizing a CSV with a tokenizer run (a 4-bit
pixel tokenizer: nothing to train), and of judging quality as the one command does (the
tokenizer's split decoded, the QualityReference, the tokenizer's ceiling, one report of 300
images), for 1x and 4x the data: synthetic digits, by default the demo's 16x16 grey at 2,000
and 8,000 images (no labels, so the feature space is the random net's; --size 64 --channels 3
for larger ones). Each measurement is a fresh process that runs the task on 200 images first
(its peak then, `warm_mb`, is what the process needs whatever the data), then on N, and reads
its own getrusage ru_maxrss. With --baseline, the same workers run against that checkout's
code (PYTHONPATH), e.g. `git worktree add /tmp/oldmem HEAD` for the code before a change.
"""

import argparse
import atexit
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_VQVAE = ["--image_size", "16", "--channels", "16", "--downsample", "4",
              "--codebook_size", "16", "--code_dim", "8", "--n_res_blocks", "1",
              "--batch_size", "16", "--max_steps", "4", "--eval_every", "4",
              "--checkpoint_every", "4"]


# data

def write_bomb(path, width, height):
    """A real PNG of width x height black grey pixels: every row compresses to almost nothing
    (15000x12000: about 175 KB on disk, 180 MB decoded)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    pack, row = zlib.compressobj(9), b"\0" * (width + 1)  # filter byte 0, then the pixels
    rows_per_piece = max(1, (4 << 20) // len(row))
    body = [pack.compress(row * min(rows_per_piece, height - start))
            for start in range(0, height, rows_per_piece)]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", b"".join(body) + pack.flush()) + chunk(b"IEND", b""))
    return path


def write_digits(folder, n, seed=0, size=16, channels=1):
    """n size x size PNGs made from scikit-learn's bundled digits (each shifted by up to a
    pixel and lightly noised, so no two files are alike; RGB ones in a random tint)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits().images
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        small = Image.fromarray((digits[rng.integers(len(digits))] * (255 / 16)).astype(np.uint8))
        pixels = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), np.float64)
        pixels = np.roll(pixels, tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
        if channels == 3:
            pixels = pixels[..., None] * rng.uniform(0.3, 1.0, 3)
        pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
        names.append(f"d{i:05d}.png")
        Image.fromarray(pixels).save(folder / names[-1])
    return names


def write_csv(path, rows):
    path.write_text("image_path\n" + "".join(f"{row}\n" for row in rows))
    return path


# workers: fresh processes that measure themselves

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def resident_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(task, arguments, out):
    """Run one task in this process; write {"peak_mb", "after_imports_mb", ...} to `out`."""
    if task == "train":  # a training as its script runs it; the figures are written at exit
        import train_vqvae
        from pipeline.cli import run_cli
        started = resident_mb()
        atexit.register(lambda: Path(out).write_text(json.dumps(
            {"peak_mb": peak_mb(), "after_imports_mb": started})))
        run_cli(train_vqvae.main, arguments)
        return
    run_id, warm_csv, csv = arguments
    from pipeline.images import read_source
    from pipeline.quality import QualityReference, degrade, run_ceiling
    from pipeline.run import judged_images, tokenizer_split
    from pipeline.tokenizers import quantize

    def run(csv):
        if task == "quantize":
            quantize(run_id, path_to_data=csv, name=Path(csv).stem)
            return {}
        source = read_source(csv)
        train, heldout, labels, heldout_labels = judged_images(*tokenizer_split(run_id, source))
        reference = QualityReference(heldout, train, labels, heldout_labels)
        ceiling, _ = run_ceiling(run_id, reference)
        report = reference.report(degrade(reference.real_images(min(300, len(train))),
                                          "light_blur"))
        return {"ceiling_fd_ratio": ceiling["fd_ratio"], "fd_ratio": report["fd_ratio"],
                "num_train": len(train), "num_heldout": len(heldout)}

    started = resident_mb()
    run(warm_csv)  # the same task on 200 images: every lazy import and fixed buffer in place
    warm, t0 = peak_mb(), time.perf_counter()
    figures = run(csv)
    Path(out).write_text(json.dumps({"peak_mb": peak_mb(), "after_imports_mb": started,
                                     "warm_mb": warm, "seconds": time.perf_counter() - t0,
                                     **figures}))


def spawn(task, arguments, workdir, tree=ROOT, timeout=600):
    """Run `worker(task, arguments)` in a fresh python on `tree`'s code; -> (figures or None,
    CompletedProcess, seconds)."""
    out = Path(tempfile.mkstemp(dir=workdir, suffix=".json")[1])
    env = {**os.environ, "PYTHONPATH": str(tree),
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--worker", task, "--out", str(out),
                             "--", *arguments], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    figures = json.loads(out.read_text()) if out.read_text().strip() else None
    out.unlink()
    return figures, result, seconds


# the cases

def trained_images(workdir, stdout):
    """The num_images param of the run a training printed (run_id=...) into workdir's store."""
    from mlflow import MlflowClient
    run_id = stdout.strip().splitlines()[-1].split("=", 1)[1]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return int(client.get_run(run_id).data.params["num_images"])

def cases(workdir, tree=ROOT):
    """Trainings that meet a PNG bomb -> [{"case", "outcome", "lost", "recover_s"}]; `tree`:
    the checkout whose code runs them."""
    workdir = Path(workdir)
    folder = workdir / "bombs"
    names = write_digits(folder / "ok", 40, seed=1)
    rows = []
    for width, height in ((15000, 12000), (12000, 12000)):
        bomb = write_bomb(folder / f"bomb_{width}x{height}.png", width, height)
        csv = write_csv(folder / f"with_{bomb.stem}.csv",
                        [*(f"ok/{name}" for name in names[:20]), bomb.name,
                         *(f"ok/{name}" for name in names[20:])])
        size = f"{bomb.stat().st_size / 1e3:.0f} KB, {width}x{height}"
        for skip in (False, True):
            args = ["--path_to_data", str(csv), *TINY_VQVAE, "--experiment", "fault_memory"]
            args += ["--skip_bad_images"] if skip else []
            figures, result, seconds = spawn("train", args, workdir, tree)
            err = [line.replace(f"{folder}/", "") for line in result.stderr.splitlines()
                   if line.strip()]
            warned = [line for line in err if line.startswith("warning: skipping")]
            peak = f", peak RSS {figures['peak_mb']:.0f} MB" if figures else ""
            if result.returncode == 2:
                outcome = f"exit 2, {err[-1]}"
                lost = "nothing: no run created"
            elif result.returncode == 0:
                outcome = f"exit 0, run FINISHED, {warned[0] if warned else 'no warning'}"
                trained = trained_images(workdir, result.stdout)
                lost = (f"the bomb only ({trained} of 41 images trained on)" if trained == 40
                        else f"nothing skipped: {trained} of 41 images trained on, the bomb "
                             f"decoded ({width * height / 1e6:.0f} MB) among them")
            else:
                outcome = f"exit {result.returncode}, {(err or ['?'])[-1]}"
                lost = "the run"
            rows.append({"case": f"bomb ({size}){' with --skip_bad_images' if skip else ''}",
                         "outcome": outcome + peak, "lost": lost, "recover_s": seconds})
    return rows


# memory against the data's size

def memory(workdir, baseline=None, n=2000, size=16, channels=1):
    """Peak RSS of quantizing and of judging quality for n and 4n images -> one dict per
    (task, code, N): {"task", "code", "n", "peak_mb", "warm_mb", "after_imports_mb",
    "growth_mb", "seconds", ...}. warm_mb: the peak after the same task on 200 images (what
    the process needs whatever the data); growth_mb: the 4n peak less the n peak, on the 4n
    row. `baseline`: another checkout whose code is measured too."""
    workdir = Path(workdir)
    folder = workdir / f"digits_{size}px_{channels}ch"
    names = write_digits(folder / "images", 4 * n, 0, size, channels)
    csvs = {count: write_csv(folder / f"digits_{count}.csv",
                             [f"images/{name}" for name in names[:count]])
            for count in (n, 4 * n)}
    fit_csv = write_csv(folder / "fit.csv", [f"images/{name}" for name in names[:200]])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"  # the workers'
    from pipeline.tokenizers import fit_tokenizer
    # a 4-bit pixel tokenizer: nothing to train, a code per pixel value (S x S*C grids)
    run_id = fit_tokenizer("pixels", {"image_size": size, "mode": "levels", "bits": 4},
                           {"path_to_data": str(fit_csv), "experiment": "fault_memory"})
    trees = {"now": ROOT, **({"baseline": Path(baseline)} if baseline else {})}
    rows = []
    for task in ("quantize", "quality"):
        for code, tree in trees.items():
            peaks = {}
            for count, csv in csvs.items():
                figures, result, seconds = spawn(task, [run_id, str(fit_csv), str(csv)],
                                                 workdir, tree)
                if figures is None or result.returncode:
                    raise RuntimeError(f"{task} on {count} images ({code}) failed:\n"
                                       f"{result.stderr[-2000:]}")
                peaks[count] = figures["peak_mb"]
                rows.append({"task": task, "code": code, "n": count, **figures,
                             "growth_mb": figures["peak_mb"] - peaks[n] if count > n else None})
    return rows


def print_cases(rows):
    print(f"{'case':<52} {'recover_s':>9}  lost")
    for row in rows:
        print(f"{row['case']:<52} {row['recover_s']:>9.1f}  {row['lost']}")
        print(f"    {row['outcome']}")


def print_memory(rows):
    print(f"{'task':<9} {'code':<9} {'N':>6} {'peak RSS MB':>12} {'at 200 images':>14} "
          f"{'above it':>9} {'growth 1x->4x MB':>17} {'s':>6}")
    for row in rows:
        growth = "" if row["growth_mb"] is None else f"{row['growth_mb']:+.0f}"
        print(f"{row['task']:<9} {row['code']:<9} {row['n']:>6} {row['peak_mb']:>12.0f} "
              f"{row['warm_mb']:>14.0f} {row['peak_mb'] - row['warm_mb']:>9.0f} "
              f"{growth:>17} {row['seconds']:>6.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write images and the store (default: a "
                                          "temporary folder)")
    parser.add_argument("--baseline", help="another checkout whose code is measured too")
    parser.add_argument("--n", type=int, default=2000, help="images at 1x (4x is 4 times)")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="grey or RGB")
    parser.add_argument("--only", choices=("cases", "memory"), help="one table only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("arguments", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.arguments, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if args.only != "memory":
            print_cases(cases(workdir))
            print()
        if args.only != "cases":
            print_memory(memory(workdir, args.baseline, args.n, args.size, args.channels))


if __name__ == "__main__":
    main()
