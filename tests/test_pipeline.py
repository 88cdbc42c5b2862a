"""`python -m pipeline` end to end on the tiny preset: outputs, reuse, resume."""

import json

import pytest

from conftest import labelled_csv, run_main
from pipeline import tracking
from pipeline.__main__ import main as pipeline_main
from core.errors import UserError


@pytest.fixture(scope="module")
def digits_like(tmp_path_factory):
    return labelled_csv(tmp_path_factory.mktemp("pipe"), n=40, seed=1)


def pipeline(csv, out, experiment):
    return run_main(pipeline_main, ["--path_to_data", str(csv), "--out_dir", str(out),
                                    "--preset", "tiny", "--experiment", experiment])


def test_end_to_end_then_reuse(store, digits_like, tmp_path):
    out = tmp_path / "out"
    parent = pipeline(digits_like, out, "pipe-e2e")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline_run_id"] == parent
    assert summary["stages"] == {"tokenizer": "new", "prior": "new"}
    assert len(list((out / "samples").glob("sample_*.png"))) == 64 and (out / "grid.png").is_file()
    run_ids = {k: v for k, v in summary.items() if k.endswith("run_id")}
    assert set(run_ids) == {"pipeline_run_id", "tokenizer_run_id", "prior_run_id"}
    for stage, key in (("tokenizer", "tokenizer_run_id"), ("prior", "prior_run_id")):
        run = tracking.client().get_run(summary[key])
        assert run.data.tags[tracking.STAGE_TAG] == stage
        assert run.data.tags["mlflow.parentRunId"] == parent
    prior = tracking.client().get_run(summary["prior_run_id"])
    assert prior.data.tags[tracking.TOKENIZER_RUN_TAG] == summary["tokenizer_run_id"]
    metrics = summary["metrics"]
    for key in ("tokenizer/val/psnr_db", "prior/val/bits_per_dim", "quality/fd_ratio",
                "quality/nn_ratio", "quality/classes_present", "quality/precision",
                "quality/real_recall", "ceiling/psnr", "ceiling/fd_ratio", "ceiling/recall"):
        assert key in metrics, key
    assert summary["feature_space"] == "classifier+random"  # the CSV has labels
    assert summary["tone_matched"] is True  # a VQ-VAE that recorded its training quantiles
    # the figures are means over 8 draws (the saved samples, then seeds 1-7), which differ
    assert metrics["quality/draws"] == 8 and metrics["quality/fd_ratio_sd"] > 0
    # the tokenizer's ceiling is also on the VQ-VAE run, at its checkpoint's step
    vq_metrics = tracking.client().get_run(summary["tokenizer_run_id"]).data.metrics
    assert vq_metrics["ceiling/psnr"] == pytest.approx(metrics["ceiling/psnr"])
    (logged,) = tracking.client().get_metric_history(summary["tokenizer_run_id"], "ceiling/fd_ratio")
    assert logged.step in (15, 30)  # best.pt's step (the tiny preset evaluates at 15 and 30)
    assert tracking.client().get_run(parent).data.metrics["quality/fd_ratio"] == pytest.approx(
        metrics["quality/fd_ratio"])
    run = tracking.client().get_run(parent)  # what the UI shows of the parent run
    assert run.info.run_name == f"pipeline tiny {digits_like.parent.name}/train"
    note = run.data.tags["mlflow.note.content"]
    assert "python -m pipeline --path_to_data" in note and summary["prior_run_id"] in note
    # the CSV, and its validation split that the quality figures were judged on
    assert [(i.dataset.name, i.tags[0].value) for i in run.inputs.dataset_inputs] == \
        [(f"{digits_like.parent.name}/train.csv", c) for c in ("training", "evaluation")]
    assert "None" not in run.data.params.values()  # e.g. sample.top_k is left out

    again = pipeline(digits_like, out, "pipe-e2e")
    second = json.loads((out / "summary.json").read_text())
    assert again != parent and second["stages"] == {"tokenizer": "reuse", "prior": "reuse"}
    assert second["tokenizer_run_id"] == summary["tokenizer_run_id"]
    assert second["metrics"]["ceiling/psnr"] == pytest.approx(metrics["ceiling/psnr"])
    assert len(tracking.client().get_metric_history(summary["tokenizer_run_id"],
                                                    "ceiling/psnr")) == 1  # not logged twice
    assert second["prior_run_id"] == summary["prior_run_id"]

    changed = run_main(pipeline_main, ["--path_to_data", str(digits_like), "--out_dir", str(out),
                                       "--preset", "tiny", "--experiment", "pipe-e2e",
                                       "--prior.n_layer", "1"])
    third = json.loads((out / "summary.json").read_text())
    assert third["stages"] == {"tokenizer": "reuse", "prior": "new"} and changed != again
    # --vqvae.<flag> is --tokenizer.<flag> for the VQ-VAE: the same settings, the same stage
    run_main(pipeline_main, ["--path_to_data", str(digits_like), "--out_dir", str(out),
                             "--preset", "tiny", "--experiment", "pipe-e2e",
                             "--vqvae.max_steps", "30", "--tokenizer.codebook_size", "16"])
    fourth = json.loads((out / "summary.json").read_text())
    assert fourth["stages"]["tokenizer"] == "reuse"
    assert fourth["tokenizer_run_id"] == summary["tokenizer_run_id"]


def test_pixels_tokenizer_end_to_end(store, digits_like, tmp_path):
    """`--tokenizer pixels`: a fitted tokenizer runs the same chain and gets the same figures,
    its ceiling included (2-bit levels lose detail: the ceiling says how much)."""
    out = tmp_path / "out"
    run_main(pipeline_main, ["--path_to_data", str(digits_like), "--out_dir", str(out),
                             "--preset", "tiny", "--experiment", "pipe-pixels",
                             "--tokenizer", "pixels", "--tokenizer.bits", "2",
                             "--sample.num_samples", "16", "--quality_draws", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokenizer"] == "pixels" and summary["stages"] == {"tokenizer": "new",
                                                                      "prior": "new"}
    assert len(list((out / "samples").glob("sample_*.png"))) == 16
    tokenizer = tracking.client().get_run(summary["tokenizer_run_id"])
    assert tokenizer.data.tags[tracking.TOKENIZER_TAG] == "pixels"
    assert tokenizer.data.params["bits"] == "2" and tokenizer.info.run_name == \
        "pixels levels 2bit 16px"
    metrics = summary["metrics"]
    for key in ("quality/fd_ratio", "quality/precision", "quality/recall", "ceiling/fd_ratio",
                "ceiling/psnr", "ceiling/precision", "prior/val/bits_per_dim"):
        assert key in metrics, key
    # 4 grey levels: lossy, but far from noise (an 8-bit image would read PSNR 59 dB)
    assert 10 < metrics["ceiling/psnr"] < 40
    assert summary["tone_matched"] is False  # a pixel tokenizer records no quantiles


def test_seed_redraws_the_training_but_not_the_judge(store, digits_like, tmp_path):
    """With a held-out CSV the quality reference (classifier, random features, real images)
    depends on the data alone, so runs that differ only in --seed are judged alike."""
    heldout = labelled_csv(tmp_path, n=24, seed=7, name="heldout.csv")
    summaries = []
    for seed in (0, 1):
        out = tmp_path / f"out{seed}"
        run_main(pipeline_main, ["--path_to_data", str(digits_like), "--out_dir", str(out),
                                 "--preset", "tiny", "--experiment", "pipe-judge",
                                 "--heldout", str(heldout), "--seed", str(seed)])
        summaries.append(json.loads((out / "summary.json").read_text()))
    first, second = summaries
    assert first["tokenizer_run_id"] != second["tokenizer_run_id"]  # a new training...
    assert first["metrics"]["quality/fd"] != second["metrics"]["quality/fd"]
    for key in ("quality/fd_real", "quality/real_precision", "quality/real_recall",
                "quality/real_classifier_confidence", "quality/classifier_heldout_accuracy"):
        assert first["metrics"][key] == pytest.approx(second["metrics"][key]), key  # ...one judge

    # `python -m pipeline quality` on the first prior: the figures the pipeline printed, in an
    # evaluation run whose input is the held-out CSV
    eval_run = run_main(pipeline_main, ["quality", "--run_id", first["prior_run_id"],
                                        "--path_to_data", str(heldout)])
    run = tracking.client().get_run(eval_run)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.STAGE_TAG] == "quality"
    assert run.data.tags["pipeline.prior_run_id"] == first["prior_run_id"]
    assert run.data.params["draws"] == "8"  # the pipeline run's, as are its sampling settings
    judged = run.data.metrics
    compared = [k for k in first["metrics"] if k.startswith(("quality/", "ceiling/"))]
    assert "quality/fd_ratio" in compared and "ceiling/fd_ratio" in compared
    for key in compared:
        assert judged[key] == pytest.approx(first["metrics"][key], rel=1e-6, abs=1e-9), key
    inputs = run.inputs.dataset_inputs
    assert [i.tags[0].value for i in inputs] == ["evaluation"]
    # other settings give other figures, named in the run's params
    other = run_main(pipeline_main, ["quality", "--run_id", first["prior_run_id"],
                                     "--path_to_data", str(heldout), "--draws", "1",
                                     "--sample.temperature", "3.0"])
    other = tracking.client().get_run(other).data
    assert other.params["sample.temperature"] == "3.0" and other.params["draws"] == "1"
    assert other.metrics["quality/fd_ratio"] != judged["quality/fd_ratio"]


def test_an_interrupted_stage_resumes_in_the_same_run(store, digits_like, tmp_path, monkeypatch):
    import pipeline.train_tokenizer as vqvae_trainer
    real_evaluate, calls = vqvae_trainer.evaluate, []

    def crash_on_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 30 of 30, after last.pt was written at step 15
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(vqvae_trainer, "evaluate", crash_on_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        pipeline(digits_like, tmp_path / "out", "pipe-resume")
    monkeypatch.setattr(vqvae_trainer, "evaluate", real_evaluate)
    interrupted = tracking.client().search_runs([tracking.experiment_id("pipe-resume")],
                                                "tags.`pipeline.tokenizer` = 'vqvae'")
    assert len(interrupted) == 1 and interrupted[0].info.status == "FAILED"

    pipeline(digits_like, tmp_path / "out", "pipe-resume")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["tokenizer"] == "resume"
    assert summary["tokenizer_run_id"] == interrupted[0].info.run_id
    steps = [m.step for m in tracking.client().get_metric_history(summary["tokenizer_run_id"],
                                                                  "train/vq_loss")]
    assert steps[-1] == 30 and 10 in steps


def test_bad_csv_fails_before_any_run(store, tmp_path, capsys):
    from pipeline.cli import run_cli
    (tmp_path / "x.csv").write_text("image_path\nnope.png\n")
    with pytest.raises(SystemExit):
        run_cli(pipeline_main, ["--path_to_data", str(tmp_path / "x.csv"), "--out_dir",
                                str(tmp_path / "o"), "--experiment", "pipe-bad"])
    assert "nope.png' does not exist" in capsys.readouterr().err
    assert tracking.client().get_experiment_by_name("pipe-bad") is None


def test_too_few_heldout_images_or_samples_fail_before_any_run(store, image_csv, tmp_path,
                                                                capsys):
    from pipeline.cli import run_cli
    for flags, message in (
            (["--vqvae.val_fraction", "0.05"], "(--tokenizer.val_fraction 0.05): 2 images; the "
                                               "quality figures need more than 3"),
            (["--vqvae.val_fraction", "0.95"], "the training split of"),
            (["--sample.num_samples", "3"], "3 samples (--sample.num_samples or"),
            (["--sample.labels", "0,1"], "2 samples (--sample.num_samples or"),
            (["--quality_draws", "0"], "--quality_draws must be at least 1, got 0")):
        with pytest.raises(SystemExit):
            run_cli(pipeline_main, ["--path_to_data", str(image_csv), "--out_dir",
                                    str(tmp_path / "o"), "--preset", "tiny",
                                    "--experiment", "pipe-few", *flags])
        assert message in capsys.readouterr().err
    assert tracking.client().get_experiment_by_name("pipe-few") is None


def test_conditional_and_sampler_flags_reach_training_and_sampling(store, digits_like, tmp_path):
    out = tmp_path / "out"
    run_main(pipeline_main, ["--path_to_data", str(digits_like), "--out_dir", str(out),
                             "--preset", "tiny", "--experiment", "pipe-flags",
                             "--prior.conditional", "--no-prior.log_model",
                             "--sample.labels", "all", "--sample.guidance", "2",
                             "--sample.num_samples", "20", "--sample.top_k", "8"])
    summary = json.loads((out / "summary.json").read_text())
    prior = tracking.client().get_run(summary["prior_run_id"])
    assert prior.data.params["conditional"] == "True" and prior.data.params["num_classes"] == "2"
    record = tracking.load_json_artifact(summary["prior_run_id"],
                                         summary["generated"].replace(".npy", ".json"))
    assert record["labels"] == ["0", "1"] * 10  # each class in turn
    assert (record["guidance"], record["top_k"], record["num_samples"]) == (2.0, 8, 20)
    assert 0 <= summary["metrics"]["quality/label_agreement"] <= 1
    from PIL import Image
    width, height = Image.open(out / "grid.png").size
    assert height > 3 * width  # one column per class: 2 columns of 8 samples

    # the absorbing prior's sampler settings reach its sampler
    run_main(pipeline_main, ["--path_to_data", str(digits_like), "--out_dir", str(out),
                             "--preset", "tiny", "--experiment", "pipe-flags",
                             "--prior.prior", "absorbing", "--no-prior.log_model",
                             "--sample.sampler", "maskgit", "--sample.steps", "3"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["tokenizer"] == "reuse"
    assert tracking.client().get_run(summary["prior_run_id"]).data.tags["pipeline.prior"] == \
        "absorbing"
    record = tracking.load_json_artifact(summary["prior_run_id"],
                                         summary["generated"].replace(".npy", ".json"))
    assert (record["sampler"], record["steps"], record["labels"]) == ("maskgit", 3, None)


def test_label_settings_of_a_preset_are_left_out_without_labels():
    from pipeline.run import fit_label_settings
    preset = {"prior": {"conditional": True}, "sample": {"labels": "all", "guidance": 2.0}}
    settings = json.loads(json.dumps(preset))
    assert fit_label_settings(settings, {}, has_labels=True) == [] and settings == preset
    dropped = fit_label_settings(settings, {}, has_labels=False)
    assert dropped == ["prior.conditional", "sample.labels", "sample.guidance"]
    assert settings == {"prior": {"conditional": False},
                        "sample": {"labels": None, "guidance": None}}
    # the user's own label flags on data without labels: an error before any training
    for stage, key, value in (("prior", "conditional", True), ("sample", "labels", "all"),
                              ("sample", "guidance", 2.0)):
        with pytest.raises(UserError, match=f"--{stage}.{key}: the data has no labels"):
            fit_label_settings(json.loads(json.dumps(preset)), {stage: {key: value}}, False)
    # --no-prior.conditional on labelled data: sample without the preset's labels
    settings = {"prior": {"conditional": False}, "sample": {"labels": "all", "guidance": 2.0}}
    assert fit_label_settings(settings, {"prior": {"conditional": False}}, True) == \
        ["sample.labels", "sample.guidance"]
