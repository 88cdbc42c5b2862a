"""A prior run as an MLflow Model: logged with its tokenizer, registered, loaded by models:/ URIs
in every script, and served by a real `mlflow models serve` on loopback."""

import base64
import io
import json
import re

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


def test_mlflow_models_serve_answers_invocations_with_images(registered, store):
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
                            (b"{not json", "JSON")):
            status, error = server.invoke(body)
            assert 400 <= status < 500 and match in json.dumps(error), (status, error)
    finally:
        server.stop()
