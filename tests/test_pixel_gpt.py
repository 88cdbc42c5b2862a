"""Pixel-level GPTs through the scripts: every attention kind trains on RGB levels with the
mixture head and completes images from an offset; a wall-time training budget; Image GPT's
probes, the fine-tuned classifier as an MLflow Model and `classify`; GIFs of sampling."""

import base64
import contextlib
import io
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


def classify_main(argv):
    """`python -m pipeline classify` in-process -> its stdout's key=value lines as a dict."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pipeline_main(["classify", *argv])
    return dict(line.split("=", 1) for line in out.getvalue().split())


def test_probe_finds_the_class_in_the_features_and_logs_a_probe_run(stripes_prior, tmp_path):
    run_id = run_main(pipeline_main, ["probe", "--run_id", stripes_prior["prior"],
                                      "--path_to_data", str(stripes_prior["train"]),
                                      "--heldout", str(stripes_prior["heldout"]), "--finetune",
                                      "--finetune_steps", "30", "--batch_size", "8",
                                      "--register", "stripes-classifier"])
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
    # the fine-tuned classifier, registered, classifies the held-out CSV as the probe scored it
    out = tmp_path / "predictions.csv"
    printed = classify_main(["--model", "models:/stripes-classifier@champion", "--path_to_data",
                             str(stripes_prior["heldout"]), "--out", str(out)])
    assert float(printed["accuracy"]) == pytest.approx(metrics["finetune/heldout_accuracy"])
    table = __import__("pandas").read_csv(out, dtype={"label": str, "predicted": str})
    assert list(table.columns) == ["image_path", "label", "predicted", "0", "1", "2"]
    assert len(table) == 15 and np.allclose(table[["0", "1", "2"]].sum(1), 1)
    assert (table["label"] == table["predicted"]).mean() == pytest.approx(
        float(printed["accuracy"]))


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


def test_the_classifier_model_round_trips_through_pyfunc(stripes_prior, capsys):
    import mlflow
    import pandas as pd
    import torch
    from mlflow.exceptions import MlflowException
    from pipeline.classify import Classifier, PooledClassifier, log_classifier
    from pipeline.generate import LoadedPrior
    from pipeline.images import read_table
    from pipeline.probe import read_labelled
    prior = LoadedPrior(stripes_prior["prior"], torch.device("cpu"))
    tokenizer = prior.tokenizer()
    torch.manual_seed(0)  # any head will do: the model must give what the objects give
    classifier = Classifier(prior.model, PooledClassifier(32, 3), ["a", "b", "c"], tokenizer)
    run_id = tracking.create_run("probe", experiment="probes elsewhere")
    uri, _ = log_classifier(run_id, classifier, prior)
    tracking.end_run(run_id, "FINISHED")
    # the model sits beside its run, in the run's experiment (not the process's Default)
    logged = tracking.client().get_logged_model(uri.split("/")[-1])
    assert logged.experiment_id == tracking.client().get_run(run_id).info.experiment_id
    assert logged.source_run_id == run_id
    heldout = stripes_prior["heldout"]
    images, _ = read_labelled(heldout, tokenizer)
    expected = classifier.probabilities(images)  # (15, 3)
    pngs = [base64.b64encode(path.read_bytes()).decode() for path in read_table(heldout).paths]
    model = mlflow.pyfunc.load_model(uri)
    answer = model.predict(pd.DataFrame({"image_png_base64": pngs}))
    assert list(answer.columns) == ["a", "b", "c", "label"]
    np.testing.assert_allclose(answer[["a", "b", "c"]].to_numpy(), expected, rtol=0, atol=1e-6)
    assert list(answer["label"]) == [["a", "b", "c"][i] for i in expected.argmax(1)]
    with pytest.raises(MlflowException, match="needs a column `image_png_base64`"):
        model.predict(pd.DataFrame({"image": pngs[:1]}))
    not_an_image = base64.b64encode(b"GIF89a, or not").decode()
    with pytest.raises(MlflowException, match="row 1: cannot read the image"):
        model.predict(pd.DataFrame({"image_png_base64": [pngs[0], not_an_image]}))
    # the command: a run that is no probe, or a URI that names no model, is one line
    assert cli_error(pipeline_main, ["classify", "--model", stripes_prior["prior"],
                                     "--path_to_data", str(heldout)], capsys).endswith(
        "is a 'prior' run, expected a 'probe' run")
    assert "--model models:/nobody/1: cannot load the model" in cli_error(
        pipeline_main, ["classify", "--model", "models:/nobody/1", "--path_to_data",
                        str(heldout)], capsys)
    assert cli_error(pipeline_main, ["classify", "--model", "models:/nobody/1", "--path_to_data",
                                     "missing.csv"], capsys) == \
        "error: missing.csv: no such CSV file or folder"


@pytest.fixture(scope="module")
def stripes_absorbing(stripes_prior):
    return run_main(train_prior_script.main, ["--run_id", stripes_prior["tokenizer"], "--prior",
                                              "absorbing", "--max_steps", "4", "--eval_every",
                                              "4", *TINY_PRIOR])


def test_probe_and_classify_an_absorbing_prior(stripes_prior, stripes_absorbing, tmp_path):
    run_id = run_main(pipeline_main, ["probe", "--run_id", stripes_absorbing,
                                      "--path_to_data", str(stripes_prior["train"]),
                                      "--heldout", str(stripes_prior["heldout"]), "--finetune",
                                      "--finetune_steps", "4", "--batch_size", "8"])
    metrics = tracking.client().get_run(run_id).data.metrics
    assert metrics["linear_probe/best_layer"] in (0, 1, 2)  # the input and 2 blocks
    assert 0 <= metrics["linear_probe/heldout_accuracy"] <= 1
    printed = classify_main(["--model", run_id, "--path_to_data", str(stripes_prior["heldout"]),
                             "--out", str(tmp_path / "p.csv")])
    assert float(printed["accuracy"]) == pytest.approx(metrics["finetune/heldout_accuracy"])


def test_a_gif_of_sampling_ends_on_the_saved_samples(stripes_prior, tmp_path):
    from pipeline.sampling_gif import read_gif
    prior = stripes_prior["prior"]
    run_main(transformer_generation.main, ["--run_id", prior, "--num_samples", "6",
                                           "--batch_size", "4", "--gif", "--name", "gif",
                                           "--out_dir", str(tmp_path)])
    frames = read_gif(tmp_path / "sampling.gif")
    # 64 pixels drawn one at a time: 65 steps with the start, more than 64, so every second
    assert len(frames) == 33
    grid = np.array(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert np.array_equal(np.array(frames[-1]), grid)  # grey images: the GIF is exact
    assert (np.array(frames[0]) == 128).all()  # all grey: nothing drawn yet
    assert "generated/gif.gif" in tracking.list_artifacts(prior, "generated")


@pytest.mark.parametrize("sampler", ["absorbing", "maskgit"])
def test_a_gif_of_parallel_decoding_has_a_frame_per_step(stripes_prior, stripes_absorbing,
                                                         sampler, tmp_path):
    from pipeline.sampling_gif import read_gif
    run_main(transformer_generation.main, ["--run_id", stripes_absorbing, "--num_samples", "4",
                                           "--steps", "4", "--sampler", sampler, "--gif",
                                           "--out_dir", str(tmp_path)])
    frames = read_gif(tmp_path / "sampling.gif")
    assert len(frames) == 5  # the start and 4 steps
    assert np.array_equal(np.array(frames[-1]),
                          np.array(Image.open(tmp_path / "grid.png").convert("RGB")))
    run_main(transformer_generation.main, ["--run_id", stripes_absorbing, "--complete",
                                           str(stripes_prior["heldout"]), "--keep", "center",
                                           "--index", "2,5", "--num_completions", "2",
                                           "--steps", "3", "--sampler", sampler, "--gif",
                                           "--name", f"gif-{sampler}", "--out_dir",
                                           str(tmp_path)])
    assert len(read_gif(tmp_path / "completions.gif")) == 4
    assert "completions/gif-" + sampler + "/completion.gif" in tracking.list_artifacts(
        stripes_absorbing, f"completions/gif-{sampler}")
