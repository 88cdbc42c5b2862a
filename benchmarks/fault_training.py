"""The training side's faults, each played as an operator meets it, in real processes.

    python -m benchmarks.fault_training [--workdir DIR]

`cases(workdir)` runs every case against one sqlite store in `workdir` and returns one dict
per case: {"case", "outcome", "lost", "recover_s"}. "lost" is "nothing" when every checkpoint
loads (local and uploaded) and the run's train/lr steps are exactly those a training without
the fault would have logged; recover_s is the wall time of what brings the work back (the
resume, the generation that falls back...), None where there is nothing to recover. Tiny
models on the CPU: the times are mostly process start-up.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VQVAE = ["--image_size", "16", "--channels", "16", "--downsample", "4", "--codebook_size", "16",
         "--code_dim", "8", "--n_res_blocks", "1", "--batch_size", "16"]
PRIOR = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "16",
         "--dropout", "0.0", "--no-log_model"]
# a script run through a patch: python -c PATCHED <script> <patch> args...
PATCHED = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
script, patch = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
exec(patch)
runpy.run_path(script, run_name="__main__")
"""
REFUSE_CHECKPOINTS = """
import requests
from pipeline import tracking
real = tracking.client().log_artifact
def log_artifact(run_id, path, artifact_path=None):
    if artifact_path == "checkpoints":
        response = requests.Response()
        response.status_code = 403
        raise requests.HTTPError("403 Client Error: Forbidden", response=response)
    return real(run_id, path, artifact_path)
tracking.client().log_artifact = log_artifact
"""
FULL_AT_SECOND_SAVE = """
import errno, torch
real, saves = torch.save, []
def save(*args, **kwargs):
    saves.append(1)
    if len(saves) >= 3:  # best.pt and last.pt at step 10 fit; nothing after
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kwargs)
torch.save = save
"""
RANK_1_FAILS = """
from pipeline import train_loop
schedule = train_loop.learning_rate_at
def learning_rate_at(step, *args):
    if os.environ.get("RANK") == "1" and step == 5:
        open(os.environ["FAULT_AT"], "w").write(repr(time.time()))
        {fault}
    return schedule(step, *args)
train_loop.learning_rate_at = learning_rate_at
"""


class Store:
    """The workdir's sqlite store, and the scripts run against it."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{self.workdir / 'mlflow.db'}",
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

    def command(self, script, args, patch=None, torchrun=False):
        body = [str(ROOT / script)]
        if patch is not None:
            wrapper = self.workdir / "patched.py"
            wrapper.write_text(PATCHED.format(root=str(ROOT)))
            body = [str(wrapper), str(ROOT / script), patch]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", "2"] if torchrun else [sys.executable])
        return launcher + body + list(args)

    def run(self, script, args, patch=None, torchrun=False, env=None):
        """-> (CompletedProcess, wall seconds)."""
        start = time.perf_counter()
        result = subprocess.run(self.command(script, args, patch, torchrun), cwd=self.workdir,
                                env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=900)
        return result, time.perf_counter() - start

    def start(self, script, args, log):
        return subprocess.Popen(self.command(script, args), cwd=self.workdir, env=self.env,
                                stdout=log, stderr=log)


def error_line(text):
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    return lines[-1][len("error: "):] if lines else "(no error line)"


def run_id_of(result):
    lines = [line for line in result.stdout.splitlines() if line.startswith("run_id=")]
    return lines[-1].split("=", 1)[1] if lines else None


def make_data(folder):
    """48 synthetic 16x16 images (a bright rectangle on noise) and a CSV; a codes .npy."""
    rng = np.random.default_rng(0)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(48):
        pixels = rng.integers(0, 30, (16, 16)).astype(np.uint8)
        r, c = rng.integers(0, 8, 2)
        pixels[r:r + 8, c:c + 5] = 220
        Image.fromarray(pixels, "L").save(folder / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png")
    (folder / "train.csv").write_text("image_path\n" + "\n".join(rows) + "\n")
    np.save(folder / "codes.npy", rng.integers(0, 16, (64, 4, 4)))
    return folder / "train.csv", folder / "codes.npy"


# what "nothing lost" means

def check(run_id, local_dir, expected_steps, status="FINISHED"):
    """What was lost: 'nothing', or the list of what did not hold. expected_steps: the
    train/lr steps, a step trained twice (after a resume from an older checkpoint) twice."""
    from pipeline import tracking
    from pipeline.checkpoint import load_checkpoint
    from core.errors import UserError
    problems = []
    run = tracking.client().get_run(run_id)
    if run.info.status != status:
        problems.append(f"run is {run.info.status}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("last.pt", "best.pt"):
            try:
                uploaded = load_checkpoint(tracking.download_artifact(
                    run_id, f"checkpoints/{name}", tmp))
                local = load_checkpoint(Path(local_dir) / run_id / name)
                if uploaded["step"] != local["step"]:
                    problems.append(f"uploaded {name} at step {uploaded['step']}, local at "
                                    f"{local['step']}")
            except (UserError, OSError) as e:
                problems.append(f"{name}: {e}")
    steps = sorted(m.step for m in tracking.client().get_metric_history(run_id, "train/lr"))
    if steps != sorted(expected_steps):
        missing = sorted(set(expected_steps) - set(steps))
        repeated = len(steps) - len(set(steps))
        problems.append(f"train/lr steps: {len(missing)} missing, {repeated} repeated")
    if list(Path(local_dir, run_id).glob("*.tmp")):
        problems.append("a temporary file was left")
    return "; ".join(problems) or "nothing"


def logged_steps(last, stops=(), again=()):
    """The train/lr steps of a training logged every 10 steps and where it stopped; `again`:
    steps logged a second time because a resume trained them again."""
    return sorted(set(range(10, last + 1, 10)) | set(stops)) + list(again)


def wait_for_checkpoint(folder, step, process, limit_s=600):
    from pipeline.checkpoint import load_checkpoint
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        for path in Path(folder).glob("*/last.pt"):
            try:
                if load_checkpoint(path)["step"] >= step:
                    return path.parent
            except Exception:
                pass
        if process.poll() is not None:
            raise RuntimeError("the training ended before its checkpoint")
        time.sleep(0.05)
    raise RuntimeError(f"no checkpoint at step {step} in {limit_s} s")


# the cases

def store_opened_together(store):
    fresh = store.workdir / "fresh"
    fresh.mkdir()
    uri = f"sqlite:///{fresh / 'mlflow.db'}"
    go = fresh / "go"
    child = (f"import os, sys, time; sys.path.insert(0, {str(ROOT)!r}); import mlflow.tracking\n"
             f"from pipeline import tracking\n"
             f"open(os.path.join({str(fresh)!r}, f'ready.{{os.getpid()}}'), 'w').close()\n"
             f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
             f"start = time.perf_counter(); tracking.experiment_id('race')\n"
             f"print(time.perf_counter() - start)\n")
    processes = [subprocess.Popen([sys.executable, "-c", child], cwd=fresh, text=True,
                                  env={**store.env, "MLFLOW_TRACKING_URI": uri},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(3)]
    while len(list(fresh.glob("ready.*"))) < 3 and all(p.poll() is None for p in processes):
        time.sleep(0.01)
    go.write_text("")
    outputs = [p.communicate(timeout=600) for p in processes]
    opened = [p.returncode == 0 for p in processes]
    slowest = max((float(out) for (out, _), ok in zip(outputs, opened) if ok), default=None)
    return {"case": "3 processes open a fresh sqlite store at once",
            "outcome": f"{sum(opened)}/3 opened it",
            "lost": "nothing" if all(opened) else "a process died", "recover_s": slowest}


def owner_and_sigterm(store, csv):
    """A live run: a second process asks to resume it; then SIGTERM, then the resume."""
    folder = store.workdir / "owned"
    log = open(store.workdir / "owner.log", "w")
    owner = store.start("train_vqvae.py", ["--path_to_data", str(csv), *VQVAE, "--max_steps",
                                           "100000", "--checkpoint_every", "20", "--eval_every",
                                           "50", "--checkpoint_dir", str(folder)], log)
    run_id = wait_for_checkpoint(folder, 20, owner).name
    second, second_s = store.run("train_vqvae.py", ["--resume_run_id", run_id,
                                                    "--checkpoint_dir", str(folder)])
    unaffected = owner.poll() is None
    named = f"pid {owner.pid} on {socket.gethostname()}" in error_line(second.stderr)
    refused = {"case": "a second process resumes a live run",
               "outcome": f"exit {second.returncode}"
                          f"{', naming the owner' if named else ', owner NOT named'}; the owner "
                          f"{'goes on' if unaffected else 'stopped'} ({second_s:.0f} s)",
               "lost": "nothing" if unaffected and second.returncode == 2 else "the owner",
               "recover_s": None}

    sent = time.perf_counter()
    owner.send_signal(signal.SIGTERM)
    code = owner.wait(timeout=600)
    stop_s = time.perf_counter() - sent
    log.close()
    err = (store.workdir / "owner.log").read_text()
    from pipeline import tracking
    from pipeline.checkpoint import load_checkpoint
    killed = tracking.client().get_run(run_id).info.status
    saved = load_checkpoint(folder / run_id / "last.pt")["step"]
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(",")[0]) if code == 143 else 0
    resumed, resume_s = store.run("train_vqvae.py", ["--resume_run_id", run_id, "--max_steps",
                                                     str(stopped + 10)])
    lost = check(run_id, folder, logged_steps(stopped + 10, stops=(stopped, stopped + 10)))
    if resumed.returncode:
        lost = f"resume failed: {error_line(resumed.stderr)}"
    sigterm = {"case": "SIGTERM mid-training, then --resume_run_id",
               "outcome": f"exit {code} in {stop_s:.0f} s, last.pt at step {saved} (reached "
                          f"{stopped}), {killed}; resumed",
               "lost": lost, "recover_s": resume_s}
    return [refused, sigterm]


def faulty_training(store, csv, name, max_steps, patch):
    """train_vqvae.py under a fault `patch`, its checkpoints in a folder of their own
    -> (the process, that folder, the run id, the run's status)."""
    from pipeline import tracking
    folder = store.workdir / name
    args = ["--path_to_data", str(csv), *VQVAE, "--max_steps", str(max_steps), "--eval_every",
            "10", "--checkpoint_every", "10", "--checkpoint_dir", str(folder)]
    first, _ = store.run("train_vqvae.py", args, patch=patch)
    run_id = next(folder.iterdir()).name
    return first, folder, run_id, tracking.client().get_run(run_id).info.status


def refused_upload(store, csv):
    first, folder, run_id, status = faulty_training(store, csv, "refused", 20,
                                                    REFUSE_CHECKPOINTS)
    resumed, resume_s = store.run("train_vqvae.py", ["--resume_run_id", run_id])
    lost = check(run_id, folder, logged_steps(20))
    return {"case": "403 on every checkpoint upload, then --resume_run_id",
            "outcome": f"exit {first.returncode} naming {error_line(first.stderr).count('.pt')} "
                       f"local files, run {status}; resume uploaded them"
                       + ("" if resumed.returncode == 0 else " (FAILED)"),
            "lost": lost, "recover_s": resume_s}


def unreadable_checkpoints(store, codes):
    from pipeline import tracking
    folder = store.workdir / "torn"
    result, _ = store.run("train.py", ["--path_to_data", str(codes), "--codebook_size", "16",
                                       *PRIOR, "--max_steps", "20", "--eval_every", "10",
                                       "--checkpoint_every", "10", "--checkpoint_dir",
                                       str(folder)])
    run_id = run_id_of(result)
    stored = Path(tracking.client().get_run(run_id).info.artifact_uri.removeprefix("file://"))
    best = stored / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    generated, generate_s = store.run("transformer_generation.py",
                                      ["--run_id", run_id, "--num_samples", "4", "--no_decode",
                                       "--name", "fallback", "--out_dir",
                                       str(store.workdir / "samples")])
    warned = "using checkpoints/last.pt instead" in generated.stderr
    truncated = {"case": "best.pt truncated in the store, then generation",
                 "outcome": ("generated from last.pt, with a warning" if generated.returncode == 0
                             and warned else f"exit {generated.returncode}: "
                             f"{error_line(generated.stderr)}"),
                 "lost": "nothing" if generated.returncode == 0 else "the generation",
                 "recover_s": generate_s}

    for torn in (folder / run_id / "last.pt", stored / "checkpoints" / "last.pt"):
        torn.write_bytes(torn.read_bytes()[:100])
    best.write_bytes((folder / run_id / "best.pt").read_bytes())  # back as it was
    resumed, resume_s = store.run("train.py", ["--resume_run_id", run_id, "--max_steps", "30"])
    source = resumed.stderr.split("from step ")[1].split("\n")[0] if "from step " in \
        resumed.stderr else "?"
    # the previous last.pt is one --checkpoint_every older: its steps are trained again
    lost = check(run_id, folder, logged_steps(30, again=[20]))
    double = {"case": "last.pt torn locally and in the store, then --resume_run_id",
              "outcome": f"resumed from step {source}; finished" if resumed.returncode == 0
              else f"exit {resumed.returncode}: {error_line(resumed.stderr)}",
              "lost": "steps 11-20, trained again" + ("" if lost == "nothing" else f"; {lost}"),
              "recover_s": resume_s}
    return [truncated, double]


def full_disk(store, csv):
    first, folder, run_id, status = faulty_training(store, csv, "full", 30, FULL_AT_SECOND_SAVE)
    one_line = "Traceback" not in first.stderr and "no space left" in error_line(first.stderr)
    temporary = len(list((folder / run_id).glob("*.tmp")))
    resumed, resume_s = store.run("train_vqvae.py", ["--resume_run_id", run_id])
    lost = check(run_id, folder, logged_steps(30, again=[20]))
    return {"case": "disk full at the second checkpoint, then --resume_run_id",
            "outcome": f"exit {first.returncode}, {'one line' if one_line else 'NOT one line'}"
                       f", {temporary} .tmp left, run {status}; resumed from step 10",
            "lost": "steps 11-20, trained again" + ("" if lost == "nothing" else f"; {lost}"),
            "recover_s": resume_s}


def rank_fault(store, codes, fault, timeout_s=10):
    """A 2-process torchrun whose rank 1 raises (or hangs) at step 5; last.pt is at step 4.
    recover_s: from the fault to the end of every process."""
    from pipeline.checkpoint import load_checkpoint
    marker, folder = store.workdir / f"fault_{fault}", store.workdir / f"rank_{fault}"
    action = "raise RuntimeError('rank 1 broke')" if fault == "raises" else "time.sleep(3600)"
    result, _ = store.run("train.py", ["--path_to_data", str(codes), "--codebook_size", "16",
                                       *PRIOR, "--max_steps", "100000", "--checkpoint_every",
                                       "4", "--checkpoint_dir", str(folder), "--dist_timeout",
                                       str(timeout_s)],
                          patch=RANK_1_FAILS.format(fault=action), torchrun=True,
                          env={"FAULT_AT": str(marker)})
    ended_s = time.time() - float(marker.read_text()) if marker.exists() else None
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: rank")]
    kept = [load_checkpoint(p)["step"] for p in folder.glob("*/last.pt")]
    return {"case": f"torchrun, rank 1 {fault} at step 5 (--dist_timeout {timeout_s})",
            "outcome": f"exit {result.returncode}; {len(lines)} line(s): "
                       f"{lines[0].split('(')[-1].rstrip(')')[:40] if lines else 'none'}",
            "lost": f"step 5 (last.pt at step {kept[0]} resumes)" if kept else "no last.pt",
            "recover_s": ended_s}


def cases(workdir):
    """Run every case in `workdir`; -> [{"case", "outcome", "lost", "recover_s"}]."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = Store(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = store.env["MLFLOW_TRACKING_URI"]
    from pipeline import tracking
    tracking.reset_client()
    csv, codes = make_data(workdir / "data")
    results = [store_opened_together(store)]
    results += owner_and_sigterm(store, csv)
    results.append(refused_upload(store, csv))
    results += unreadable_checkpoints(store, codes)
    results.append(full_disk(store, csv))
    results.append(rank_fault(store, codes, "raises"))
    results.append(rank_fault(store, codes, "hangs"))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the store and runs go (default: a temporary "
                                          "folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = cases(args.workdir or tmp)
    print(f"host {socket.gethostname()}, {os.cpu_count()} CPUs")
    print("| case | outcome | lost | recover (s) |")
    print("|---|---|---|---|")
    for row in rows:
        recover = "" if row["recover_s"] is None else f"{row['recover_s']:.1f}"
        print(f"| {row['case']} | {row['outcome']} | {row['lost']} | {recover} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
