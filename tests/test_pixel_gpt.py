"""Pixel-level GPTs through the scripts: every attention kind trains on RGB levels with the
mixture head and completes images from an offset; a wall-time training budget; Image GPT's
probes."""

import json
import tempfile

import numpy as np
import pytest
from PIL import Image

import quantize_dataset
import train as train_prior_script
import transformer_generation
from conftest import TINY_PRIOR, make_images, run_main, write_csv
from pipeline import tracking
from pipeline.__main__ import main as pipeline_main
from pipeline.codes import load_run_codes
from test_bad_input import cli_error


@pytest.fixture(scope="module")
def rgb_levels(store, tmp_path_factory):
    """A 2-bit RGB levels tokenizer over 12 synthetic 8x8 images: an (8, 24) byte-stream grid."""
    folder = tmp_path_factory.mktemp("rgb_levels")
    names = make_images(folder / "imgs", n=12, size=8, mode="RGB", seed=5)
    csv = write_csv(folder / "train.csv", [f"imgs/{n}" for n in names], header="image_path")
    run_id = run_main(quantize_dataset.main, ["--path_to_data", str(csv), "--pixels", "levels",
                                              "--bits", "2"])
    return run_id, csv


def stripes(folder, n, seed):
    """Grey 8x8 images whose class (0, 1, 2) is which band of rows is bright, plus noise."""
    rng = np.random.default_rng(seed)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % 3
        pixels = rng.integers(0, 60, (8, 8)).astype(np.uint8)
        pixels[3 * label:3 * label + 2] = rng.integers(180, 255, (2, 8))
        Image.fromarray(pixels, "L").save(folder / "imgs" / f"s{seed}_{i:03d}.png")
        rows.append(f"imgs/s{seed}_{i:03d}.png,{label}")
    return write_csv(folder / f"stripes_{seed}.csv", rows)


@pytest.fixture(scope="module")
def stripes_prior(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stripes")
    train_csv, heldout_csv = stripes(folder, 60, seed=0), stripes(folder, 15, seed=1)
    tokenizer = run_main(quantize_dataset.main, ["--path_to_data", str(train_csv), "--pixels",
                                                 "levels", "--bits", "2"])
    prior = run_main(train_prior_script.main, ["--run_id", tokenizer, "--attention", "linear",
                                               "--max_steps", "6", "--eval_every", "6",
                                               *TINY_PRIOR])
    return {"prior": prior, "tokenizer": tokenizer, "train": train_csv, "heldout": heldout_csv}


@pytest.mark.parametrize("attention", ["softmax", "linear", "momentum"])
def test_every_attention_kind_completes_rgb_levels_from_an_offset(rgb_levels, attention,
                                                                   tmp_path):
    tokenizer, csv = rgb_levels
    prior = run_main(train_prior_script.main, [
        "--run_id", tokenizer, "--attention", attention, "--head", "mixture", "--mixtures", "2",
        "--max_steps", "2", "--eval_every", "2", *TINY_PRIOR])
    params = tracking.client().get_run(prior).data.params
    assert params["attention"] == attention and params["channels"] == "3"
    offset = 100  # 33 pixels and the red of the 34th: a cut inside a pixel
    run_main(transformer_generation.main, ["--run_id", prior, "--complete", str(csv),
                                           "--offset", str(offset), "--num_completions", "2",
                                           "--max_images", "2", "--name", "offset",
                                           "--out_dir", str(tmp_path)])
    codes, _ = load_run_codes(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        drawn = np.load(tracking.download_artifact(prior, "completions/offset/codes.npy", tmp))
    assert drawn.shape == (2, 2, 8, 24)
    for image in range(2):
        for k in range(2):
            assert np.array_equal(drawn[image, k].reshape(-1)[:offset],
                                  codes[image].numpy().reshape(-1)[:offset])
    assert not np.array_equal(drawn[:, :, 5:], np.broadcast_to(codes[:2, None, 5:].numpy(),
                                                               (2, 2, 3, 24)))
    assert Image.open(tmp_path / "completions.png").mode == "RGB"
    images = tracking.list_artifacts(prior, "images")
    assert any("completions" in path for path in images), images  # the figure in MLflow


def test_max_minutes_stops_training_with_a_final_evaluation_and_checkpoint(rgb_levels):
    tokenizer, _ = rgb_levels
    # a budget of 6 ms: over after the first step, whatever the machine
    prior = run_main(train_prior_script.main, ["--run_id", tokenizer, "--max_steps", "50",
                                               "--max_minutes", "0.0001", "--eval_every", "25",
                                               *TINY_PRIOR])
    run = tracking.client().get_run(prior)
    assert run.info.status == "FINISHED"
    history = tracking.client().get_metric_history(prior, "val/bits_per_dim")
    assert [m.step for m in history] == [1]
    assert {"checkpoints/last.pt", "checkpoints/best.pt"} <= set(
        tracking.list_artifacts(prior, "checkpoints"))


def test_probe_finds_the_class_in_the_features_and_logs_a_probe_run(stripes_prior, capsys):
    run_id = run_main(pipeline_main, ["probe", "--run_id", stripes_prior["prior"],
                                      "--path_to_data", str(stripes_prior["train"]),
                                      "--heldout", str(stripes_prior["heldout"]), "--finetune",
                                      "--finetune_steps", "30", "--batch_size", "8"])
    run = tracking.client().get_run(run_id)
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    assert tags[tracking.STAGE_TAG] == "probe" and run.info.status == "FINISHED"
    assert tags["pipeline.prior_run_id"] == stripes_prior["prior"]
    assert tags[tracking.TOKENIZER_RUN_TAG] == stripes_prior["tokenizer"]
    assert params["prior_run_id"] == stripes_prior["prior"] and params["num_heldout"] == "15"
    # the class is which band is bright: separable from pixels, and from the features
    assert metrics["raw_pixels/heldout_accuracy"] == 1.0
    assert metrics["linear_probe/heldout_accuracy"] >= 0.8
    assert metrics["finetune/heldout_accuracy"] >= 0.8  # 30 steps of fine-tuning learn it too
    with tempfile.TemporaryDirectory() as tmp:
        summary = json.loads(tracking.download_artifact(run_id, "probe.json", tmp).read_text())
    assert [row["layer"] for row in summary["layers"]] == [0, 1, 2]  # input + 2 blocks
    best = max(summary["layers"], key=lambda row: row["val_accuracy"])
    assert summary["best_layer"] == best["layer"] == metrics["linear_probe/best_layer"]


def test_probe_without_heldout_splits_the_csv_and_needs_labels(stripes_prior, rgb_levels,
                                                               capsys):
    run_id = run_main(pipeline_main, ["probe", "--run_id", stripes_prior["prior"],
                                      "--path_to_data", str(stripes_prior["train"])])
    params = tracking.client().get_run(run_id).data.params
    assert (params["num_train"], params["num_val"], params["num_heldout"]) == ("41", "7", "12")
    one_class = stripes_prior["train"].parent / "one_class.csv"
    one_class.write_text("".join(line.rsplit(",", 1)[0] + ",a\n" if i else line + "\n" for i, line
                                 in enumerate(stripes_prior["train"].read_text().splitlines())))
    message = cli_error(pipeline_main, ["probe", "--run_id", stripes_prior["prior"],
                                        "--path_to_data", str(one_class)], capsys)
    assert message.startswith(f"error: {one_class}: the probe's training split holds one class")
    unlabelled = rgb_levels[1]
    message = cli_error(pipeline_main, ["probe", "--run_id", stripes_prior["prior"],
                                        "--path_to_data", str(unlabelled)], capsys)
    assert message == f"error: {unlabelled}: has no `label` column; the probe needs labelled images"
