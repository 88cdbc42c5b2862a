"""The background uploader: retries what a store outage interrupts, drops what cannot succeed."""

from mlflow.exceptions import MlflowException

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
