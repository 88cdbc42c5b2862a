"""The background uploader: retries what a store outage interrupts, drops what cannot succeed;
processes opening one fresh sqlite store together."""

import os
import subprocess
import sys
import time

from mlflow.exceptions import MlflowException

from conftest import ROOT
from pipeline import tracking


def test_uploader_retries_outages_in_order_and_drops_hopeless_jobs(store, capsys):
    run_id = tracking.create_run("tokenizer")
    uploader = tracking.Uploader(run_id, flush_secs=0.01)
    done, outage = [], [2]  # the "store" refuses the first two attempts

    def flaky():
        if outage[0]:
            outage[0] -= 1
            raise MlflowException("API request failed: Connection refused")  # INTERNAL_ERROR
        done.append("flaky")

    def hopeless():
        raise ValueError("not an image")

    uploader.log_metrics({"a": 1.0}, step=1)
    uploader.submit("one", flaky, "the flaky upload")
    uploader.submit("two", hopeless, "the hopeless upload")
    uploader.submit("three", lambda: done.append("three"), "the last upload")
    uploader.log_metrics({"a": 2.0}, step=2)
    assert uploader.close(timeout=60) == ([], [])
    assert done == ["flaky", "three"]
    err = capsys.readouterr().err
    assert err.count("tracking store unreachable") == 1 and "reachable again" in err
    assert "could not log the hopeless upload, dropped" in err
    history = tracking.client().get_metric_history(run_id, "a")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0)]


def test_uploader_gives_back_what_it_could_not_send(store):
    run_id = tracking.create_run("tokenizer")
    uploader = tracking.Uploader(run_id, flush_secs=0.01)

    def down():
        raise MlflowException("API request failed: Connection refused")

    uploader.log_metrics({"a": 1.0}, step=1)
    uploader.submit("ckpt", down, "checkpoints/last.pt")
    metrics, uploads = uploader.close(timeout=3)
    assert uploads == ["checkpoints/last.pt"] and uploader.outage is not None
    # the metric, queued first, went out before the upload that failed
    assert metrics == [] and len(tracking.client().get_metric_history(run_id, "a")) == 1


def test_processes_opening_a_fresh_sqlite_store_together_all_succeed(tmp_path):
    """MLflow creates and migrates an embedded store's tables on first use; several processes
    doing it at once on a new mlflow.db used to die with sqlite/alembic errors."""
    go = tmp_path / "go"
    # every process imports MLflow, says so, then all open the store at the same moment
    child = (f"import os, sys, time; sys.path.insert(0, {str(ROOT)!r}); import mlflow.tracking\n"
             f"from pipeline import tracking\n"
             f"open(os.path.join({str(tmp_path)!r}, f'ready.{{os.getpid()}}'), 'w').close()\n"
             f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
             f"tracking.experiment_id('race')\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    processes = [subprocess.Popen([sys.executable, "-c", child], env=env, cwd=tmp_path,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    give_up = time.monotonic() + 300
    while len(list(tmp_path.glob("ready.*"))) < len(processes):
        assert time.monotonic() < give_up and all(p.poll() is None for p in processes)
        time.sleep(0.01)
    go.write_text("")
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(e[-800:] for e in errors)
