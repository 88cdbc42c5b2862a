"""What the MLflow UI shows of a run: name, description, params, datasets, step images."""

import json
import re

import numpy as np
import torch
from PIL import Image

from pipeline import describe, tracking
from pipeline.images import file_sha256
from pipeline.tracking import log_step_image
from pipeline.visual import reconstruction_grid
from pipeline.train_tokenizer import METRICS

# images/<key, / as ~>+step+<step>+timestamp+<ms>+<uuid>[+compressed].<ext>: how the run page
# finds the images of its cards
STEP_IMAGE = re.compile(r"images/(?P<key>[^+]+)\+step\+(?P<step>\d+)\+timestamp\+\d+"
                        r"\+[0-9a-f-]{36}(?P<thumb>\+compressed)?\.(?P<ext>png|webp)")


def test_names_commands_and_params():
    assert describe.run_name("vqvae", "f4", "K64", "16px", None) == "vqvae f4 K64 16px"
    assert describe.script_command("train_vqvae.py", {"path_to_data": "my data/t.csv",
                                                      "device": None, "skip_bad_images": True},
                                   {"image_size": 16}) == \
        "python train_vqvae.py --path_to_data 'my data/t.csv' --skip_bad_images --image_size 16"
    assert describe.process_command(["/x/pipeline/__main__.py", "demo"]) == \
        "python -m pipeline demo"
    assert describe.run_params({"a": 1, "b": None}, {"c": None, "d": "x"}) == {"a": 1, "d": "x"}


def step_images(run_id):
    return [STEP_IMAGE.fullmatch(p) for p in tracking.list_artifacts(run_id, "images")]


def test_step_images_are_named_as_mlflow_names_them_with_png_card_images(store, tmp_path):
    image = Image.fromarray((np.arange(300 * 200) % 256).astype(np.uint8).reshape(200, 300))
    ours, theirs = tracking.create_run("tokenizer"), tracking.create_run("tokenizer")
    log_step_image(ours, image, "a/b", 3)
    tracking.client().log_image(theirs, image, key="a/b", step=3)
    for run_id, thumb_ext in ((theirs, "webp"), (ours, "png")):  # the pattern is MLflow's own
        matches = step_images(run_id)
        assert all(matches) and len(matches) == 2, tracking.list_artifacts(run_id, "images")
        assert {(m["key"], m["step"], bool(m["thumb"]), m["ext"]) for m in matches} == \
            {("a~b", "3", False, "png"), ("a~b", "3", True, thumb_ext)}
        assert tracking.client().get_run(run_id).data.tags["mlflow.loggedImages"] == "True"
    (thumb,) = [m.group(0) for m in step_images(ours) if m["thumb"]]
    with Image.open(tracking.download_artifact(ours, thumb, tmp_path)) as card:
        # enlarged 2x (nearest) to fill the card's box: every pixel a 2x2 block
        assert card.format == "PNG" and card.size == (600, 400)
        np.testing.assert_array_equal(np.asarray(card)[::2, ::2], np.asarray(image))


def test_reconstruction_grid_is_square_with_large_cells():
    originals = torch.rand(8, 1, 16, 16)
    grid = reconstruction_grid(originals, originals)
    assert grid.width >= 4 * 64 and abs(grid.width - grid.height) < 0.1 * grid.width
    pixels = np.asarray(grid)
    tile = pixels[16:16 + 64, 2:2 + 64, 0]  # the first original, enlarged 4x (nearest)
    expected = (originals[0, 0] * 255).round().numpy().repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(tile, expected)


def test_a_vqvae_run_says_what_it_is(chain):
    run = tracking.client().get_run(chain["vqvae"])
    assert run.info.run_name == "vqvae f4 K16 16px"
    note = run.data.tags[describe.NOTE_TAG]
    assert "\n    python train_vqvae.py --path_to_data" in note and "--codebook_size 16" in note
    for name in METRICS:  # the description explains exactly the metrics the run has
        assert f"`{name}`" in note and name in run.data.metrics, name
    assert not [k for k, v in run.data.params.items() if v == "None"]
    assert "device" not in run.data.params and run.data.params["codebook_size"] == "16"

    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert inputs["training"].digest != inputs["validation"].digest
    csv_sha256 = file_sha256(chain["csv"])
    for context, rows in (("training", 43), ("validation", 5)):  # 48 rows, val_fraction 0.1
        dataset = inputs[context]
        assert json.loads(dataset.source)["uri"] == str(chain["csv"].resolve())
        assert json.loads(dataset.profile) == {"num_rows": rows, "split": context,
                                               "csv_sha256": csv_sha256}

    images = [m for m in step_images(chain["vqvae"]) if m and m["key"] == "reconstructions"]
    assert sorted({int(m["step"]) for m in images}) == [0, 40, 80]  # 0: before training
    assert {m["ext"] for m in images} == {"png"} and len(images) == 6


def test_codes_inputs_name_the_tokenizer_run_and_follow_the_contents(store):
    meta = {"csv_sha256": "ab" * 32, "codebook_size": 16}
    codes = np.arange(5 * 4 * 4).reshape(5, 4, 4) % 16
    first = describe.codes_inputs("tok123", "train", meta, codes, {"training": [0, 1, 2, 3],
                                                                   "validation": [4]})
    changed = describe.codes_inputs("tok123", "train", meta, (codes + 1) % 16,
                                    {"training": [0, 1, 2, 3], "validation": [4]})
    run_id = tracking.create_run("transformer")
    describe.log_inputs(run_id, first)
    logged = tracking.client().get_run(run_id).inputs.dataset_inputs
    assert sorted(i.tags[0].value for i in logged) == ["training", "validation"]
    for dataset in (i.dataset for i in logged):
        assert json.loads(dataset.source) == {"uri": "runs:/tok123/codes/train.npy"}
        profile = json.loads(dataset.profile)
        assert profile["tokenizer_run_id"] == "tok123" and profile["csv_sha256"] == "ab" * 32
    assert first[0].dataset.digest != changed[0].dataset.digest  # other codes, other digest
    local = describe.npy_inputs("/data/codes.npy", codes, {"training": [0, 1, 2, 3]})
    assert json.loads(local[0].dataset.source) == {"uri": "/data/codes.npy"}
    assert local[0].dataset.digest == first[0].dataset.digest  # the same codes, wherever kept


def test_a_prior_run_says_what_it_is_and_names_its_codes(chain):
    from pipeline.train_prior import METRICS as PRIOR_METRICS
    run = tracking.client().get_run(chain["prior"])
    assert run.info.run_name == "prior gpt 2L 32d K16 4x4"
    note = run.data.tags[describe.NOTE_TAG]
    assert "\n    python train.py --run_id" in note
    for name in PRIOR_METRICS:  # heldout/* comes later, from `python -m pipeline evaluate`
        assert f"`{name}`" in note
        assert name.startswith("heldout/") or name in run.data.metrics, name
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    for dataset in inputs.values():  # the codes artifact of the tokenizer run, with its CSV
        codes = f"runs:/{chain['vqvae']}/codes/{chain['csv'].stem}.npy"
        assert json.loads(dataset.source)["uri"] == codes
        assert json.loads(dataset.profile)["csv_sha256"] == file_sha256(chain["csv"])
