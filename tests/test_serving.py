"""A prior run as an MLflow Model: logged with its tokenizer, registered, loaded by models:/ URIs
in every script, and served by a real `mlflow models serve` on loopback; its bounds under
overload through MLflow's scoring app in this process (where the model can be slowed down or
broken), with a 2 s request timeout."""

import base64
import io
import json
import re
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import train as train_prior_script
import transformer_generation
from conftest import TINY_PRIOR, run_main
from pipeline import tracking
from pipeline.__main__ import main as pipeline_main
from pipeline.servers import ModelServer, free_port
from test_bad_input import cli_error

NAME = "digits-test"


@pytest.fixture(scope="module")
def registered(chain):
    """A conditional prior on the chain's VQ codes, registered as NAME version 1, @champion."""
    run_id = run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--conditional",
                                                "--max_steps", "6", "--eval_every", "6",
                                                "--register", NAME, *TINY_PRIOR])
    return run_id


def png(answer):
    return np.array(Image.open(io.BytesIO(base64.b64decode(answer["image_png_base64"]))))


def test_the_registered_model_names_its_run_and_scripts_take_models_uris(chain, registered,
                                                                          tmp_path):
    version = tracking.client().get_model_version(NAME, "1")
    assert version.run_id == registered and registered in version.description
    assert "val/bits_per_dim" in version.description
    assert "label (string)" in tracking.client().get_registered_model(NAME).description
    assert str(tracking.client().get_model_version_by_alias(NAME, "champion").version) == "1"
    for uri in (f"models:/{NAME}/1", f"models:/{NAME}@champion"):
        printed = run_main(transformer_generation.main, ["--run_id", uri, "--labels", "1,2",
                                                         "--out_dir", str(tmp_path / "s")])
        assert printed == registered  # the script prints the run the URI names
        assert run_main(pipeline_main, ["evaluate", "--run_id", uri, "--path_to_data",
                                        str(chain["csv"])]) == registered
    assert len(list((tmp_path / "s").glob("sample_*.png"))) == 2


def test_unknown_model_uri_is_a_one_line_error(registered, capsys):
    assert "no such registered model or version" in cli_error(
        transformer_generation.main, ["--run_id", f"models:/{NAME}/9"], capsys)
    assert "no such registered model or version" in cli_error(
        transformer_generation.main, ["--run_id", "models:/nobody@champion"], capsys)


def test_pyfunc_predict_gives_pngs_the_same_seed_the_same_image(registered):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    request = {"num_samples": 2.0, "label": "1", "seed": 3.0}
    answer = model.predict(pd.DataFrame([request, request, {"seed": 4.0}]))
    assert list(answer["request"]) == [0, 0, 1, 1, 2] and list(answer["sample"]) == [0, 1, 0, 1, 0]
    images = [png(row) for _, row in answer.iterrows()]
    assert images[0].shape == (16, 16) and images[0].dtype == np.uint8
    # the same request gives the same images, wherever it sits in the table
    assert np.array_equal(images[0], images[2]) and np.array_equal(images[1], images[3])
    assert not np.array_equal(images[0], images[1])
    assert np.array(json.loads(answer["codes_json"][0])).shape == (4, 4)
    # a top_p below fp32's smallest number keeps the likeliest code, every draw the same
    tiny = model.predict(pd.DataFrame([{"num_samples": 2.0, "top_p": 1e-46, "seed": 1.0}]))
    assert tiny["codes_json"][0] == tiny["codes_json"][1]
    for bad, match in (({"num_samples": 1000.0}, "num_samples must be in 1..64"),
                       ({"label": "7"}, "unknown label '7'; known labels: 0, 1, 2"),
                       ({"temperature": -1.0}, "temperature must be >= 0"),
                       ({"num_samples": 1.5}, "num_samples must be a whole number"),
                       ({"lable": "1"}, "unknown field(s) lable"),  # not dropped silently
                       ({"seed": 2 ** 64}, "seed must be in 0..9223372036854775807"),
                       ({"temperature": "hot"}, "temperature must be a number"),
                       ({"guidance": 1e300, "label": "1"}, "guidance must be in 0..100"),
                       ({"seed": 2.0 ** 60}, "is past what a float holds exactly")):
        with pytest.raises(MlflowException, match=re.escape(match)) as error:
            model.predict(pd.DataFrame([bad]))
        assert error.value.error_code == "INVALID_PARAMETER_VALUE"


def test_mlflow_models_serve_answers_invocations_with_images(registered, store, monkeypatch):
    # the bounds come from the server's environment: here 8 images of 4x4 tokens a call
    monkeypatch.setenv("PIPELINE_SERVING_MAX_TOKENS", "128")
    server = ModelServer(f"models:/{NAME}@champion", store, free_port(), tracking.tracking_uri())
    server.start()
    try:
        status, first = server.invoke({"dataframe_records": [{"num_samples": 2, "seed": 7,
                                                               "label": "2"}]})
        assert status == 200, first
        images = [png(row) for row in first["predictions"]]
        assert len(images) == 2 and images[0].shape == (16, 16)
        status, again = server.invoke({"dataframe_records": [{"num_samples": 2, "seed": 7,
                                                               "label": "2"}]})
        assert [row["image_png_base64"] for row in again["predictions"]] == \
            [row["image_png_base64"] for row in first["predictions"]]
        # MLflow's other formats reach the model as a dict of columns: read as the same table
        status, columns = server.invoke({"inputs": {"num_samples": [2], "seed": [7],
                                                    "label": ["2"]}})
        assert status == 200 and [row["image_png_base64"] for row in columns["predictions"]] \
            == [row["image_png_base64"] for row in first["predictions"]]
        for body, match in (({"dataframe_records": [{"num_samples": 100000}]}, "num_samples"),
                            ({"dataframe_records": [{"seed": 2 ** 64}]}, "seed must be in"),
                            ({"dataframe_records": [{"top_k": "many"}]}, "top_k must be a"),
                            ({"dataframe_records": [{"label": "x"}]}, "unknown label"),
                            ({"dataframe_records": [{"temperature": -2}]}, "temperature"),
                            ({"dataframe_records": [{"foo": 1}]}, "unknown field(s) foo"),
                            ({"dataframe_records": [{}]}, "no requests"),
                            ({"dataframe_records": [{"num_samples": 5}, {"num_samples": 4}]},
                             "9 images of 16 tokens = 144 tokens to draw in one call; at most "
                             "128 (PIPELINE_SERVING_MAX_TOKENS)"),
                            (b"{not json", "JSON")):
            status, error = server.invoke(body)
            assert 400 <= status < 500 and match in json.dumps(error), (status, error)
            assert "stack_trace" not in json.dumps(error)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# serving that stays up: bounds, deadlines, batching, errors (docs/serving.md, Bounds)

def served_generator(monkeypatch, **env):
    """The registered model loaded in this process with the serving environment `env`, and its
    ServedGenerator (to count, slow down or break what it does)."""
    import mlflow.pyfunc
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    return model, model.unwrap_python_model().generator


def spy(monkeypatch, owner, name):
    """Count the calls of owner.name (an instance attribute wrapping the real method)."""
    calls, real = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_rows_with_the_same_settings_are_drawn_together_and_get_what_they_get_alone(
        registered, monkeypatch):
    model, generator = served_generator(monkeypatch)
    rows = [{"num_samples": 2, "label": "1", "seed": 3},
            {"num_samples": 1, "label": "2", "seed": 4}, {"seed": 5}, {"num_samples": 2, "label": "0", "seed": 6, "temperature": 0.5},
            {"num_samples": 3, "label": "1", "seed": 8}, {"seed": 9},
            {"num_samples": 2, "label": "2", "guidance": 3.0, "seed": 1},
            {"num_samples": 1, "label": "0", "guidance": 3.0, "seed": 2}]
    draws = spy(monkeypatch, generator.model, "sample")
    together = model.predict(pd.DataFrame(rows))
    # labelled rows at the defaults, unlabelled rows, temperature 0.5, guidance 3: four batches
    assert len(draws) == 4
    for i, row in enumerate(rows):
        alone = model.predict(pd.DataFrame([row]))
        mine = together[together["request"] == i]
        assert len(mine) == len(alone) == row.get("num_samples", 1)
        assert list(mine["codes_json"]) == list(alone["codes_json"]), i
        assert list(mine["image_png_base64"]) == list(alone["image_png_base64"]), i
    assert len(draws) == 4 + len(rows)


def test_the_work_of_a_call_is_bounded_before_any_row_is_read(registered, monkeypatch):
    from mlflow.exceptions import MlflowException
    model, generator = served_generator(monkeypatch, PIPELINE_SERVING_MAX_TOKENS=64)
    checks, draws = spy(monkeypatch, generator, "_check"), spy(monkeypatch, generator.model,
                                                                 "sample")
    # 4x4 grids: 4 images are 64 tokens, 5 are 80
    assert len(model.predict(pd.DataFrame([{"num_samples": 4}]))) == 4
    for table, match in ((pd.DataFrame([{"num_samples": 3}, {"num_samples": 2, "seed": 1}]),
                          "5 images of 16 tokens = 80 tokens to draw in one call; at most 64 "
                          "(PIPELINE_SERVING_MAX_TOKENS)"),
                         (pd.DataFrame({"seed": range(300), "top_k": ["bad"] * 300}),
                          "300 images requested in one call; at most 256")):
        with pytest.raises(MlflowException, match=re.escape(match)) as error:
            model.predict(table)
        assert error.value.error_code == "INVALID_PARAMETER_VALUE"
    assert len(checks) == len(draws) == 1  # the call that was answered; no row of the others


@pytest.fixture
def scoring_app(registered, monkeypatch):
    """MLflow's scoring app (what `mlflow models serve` runs) with a 2 s request timeout, at
    most 2 calls in flight, on loopback in this process; yields (app, ServedGenerator)."""
    from pipeline.servers import ScoringApp
    model, generator = served_generator(monkeypatch, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=2,
                                        PIPELINE_SERVING_MAX_INFLIGHT=2)
    assert generator.limits.timeout_s == 2 and generator.limits.max_inflight == 2
    app = ScoringApp(model, free_port(), timeout_s=2).start()
    yield app, generator
    app.stop()


def wait_for(condition, seconds=60):
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "gave up waiting"
        time.sleep(0.01)


def test_overload_is_refused_at_once_slow_calls_stop_at_their_deadline_and_ping_answers(
        scoring_app, monkeypatch):
    app, generator = scoring_app
    prior, real_step = generator.model, generator.model.step
    request = {"dataframe_records": [{"label": "1", "seed": 3}]}
    status, expected = app.invoke(request)
    assert status == 200

    # 1. two calls in flight, computing until released: a third is refused at once (while
    # they still hold their slots), and /ping answers within a second under that load
    release, steps = threading.Event(), []

    def busy_step(*args):
        steps.append(1)
        out = real_step(*args)
        while not release.is_set():
            real_step(*args)  # the CPU stays busy; the GIL is contended
        return out

    monkeypatch.setattr(prior, "step", busy_step)
    answers = []
    held = [threading.Thread(target=lambda: answers.append(app.invoke(request)))
            for _ in range(2)]
    for thread in held:
        thread.start()
    wait_for(lambda: generator.in_flight == 2 and len(steps) >= 2)
    status, refused = app.invoke(request)
    assert status == 429 and "busy" in refused["message"] and "retry" in refused["message"]
    status, too_big = app.invoke({"dataframe_records": [{"seed": i} for i in range(300)]})
    assert status == 400 and "300 images requested" in too_big["message"]  # too big, not busy
    assert generator.in_flight == 2 and not answers  # the held calls were still computing
    pings = [app.ping() for _ in range(5)]
    assert all(status == 200 for status, _ in pings)
    assert max(seconds for _, seconds in pings) < 1.0, pings
    release.set()
    for thread in held:
        thread.join()
    # each held call is answered: its images, or a 504 when it was held past its time
    for status, answer in answers:
        assert (status, answer) == (200, expected) or status == 504, (status, answer)
    wait_for(lambda: generator.in_flight == 0)

    # 2. a slow model: sampling stops at the deadline (1.6 s) instead of computing on after
    # the 504; the thread is free again and the next call is answered
    steps.clear()

    def slow_step(*args):
        steps.append(1)
        out = real_step(*args)
        give_up = time.monotonic() + 0.25  # a step of a model far larger than this one
        while time.monotonic() < give_up:
            real_step(*args)
        return out

    monkeypatch.setattr(prior, "step", slow_step)
    status, late = app.invoke(request)
    # ours at 1.6 s (MLflow's own, a plain text, if this machine stalled past 2 s)
    assert status == 504, (status, late)
    if isinstance(late, dict):
        assert "out of time" in late["message"] and "stack_trace" not in late, late
    wait_for(lambda: generator.in_flight == 0)  # at once when the 504 was ours
    assert len(steps) < 16, "sampling ran to the end of the 4x4 grid"
    monkeypatch.setattr(prior, "step", real_step)
    assert app.invoke(request) == (200, expected)

    # 3. an error of ours: a 500 with a short message, no stack trace, no internals
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /some/path")

    real_decode = generator.tokenizer.decode
    monkeypatch.setattr(generator.tokenizer, "decode", broken)
    status, error = app.invoke(request)
    assert status == 500 and "internal error (RuntimeError)" in error["message"], error
    assert "stack_trace" not in error and "secret detail" not in json.dumps(error)
    monkeypatch.setattr(generator.tokenizer, "decode", real_decode)
    assert app.invoke(request) == (200, expected)
