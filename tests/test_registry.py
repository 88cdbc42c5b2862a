"""A registry that ranks: @champion moves only to a version whose held-out FD ratio beats the
champion's (pipeline/ranking.py); the logged model's step, tags, linked metrics and input
example; --system_metrics."""

import json
import sys

import mlflow
import pytest

import train as train_prior_script
from conftest import TINY_PRIOR, labelled_csv, run_main
from core.errors import UserError
from pipeline import ranking, served, tracking
from pipeline.__main__ import main as pipeline_main

NAME = "ranked"


def test_the_rule_on_figures():
    assert ranking.decide(None, None, has_champion=False)[0] == "champion"  # the first
    assert ranking.decide(1.2, 1.5)[0] == "champion"
    worse = ranking.decide(1.6, 1.5)
    assert worse[0] == "challenger" and "1.6000" in worse[1] and "1.5000" in worse[1]
    assert ranking.decide(1.5, 1.5)[0] == "challenger"  # a tie does not move it
    assert ranking.decide(None, 1.5)[0] == "challenger"  # no quality step
    assert ranking.decide(1.2, None)[0] == "challenger"  # the champion could not be judged


def test_the_logged_model_has_its_step_tags_linked_metrics_and_an_example(chain):
    uri, _ = served.log_generator(chain["prior"])
    model = tracking.client().get_logged_model(uri.split("/")[-1])
    assert model.tags["pipeline.prior"] == "gpt"
    assert model.tags["pipeline.tokenizer"] == "vqvae"
    assert model.tags["pipeline.tokenizer_run_id"] == chain["vqvae"]
    # logged at best.pt's step: the validation figures of that step, naming the split
    best = min(tracking.client().get_metric_history(chain["prior"], "val/nats_per_token"),
               key=lambda m: m.value)
    linked = {m.key: m for m in model.metrics if m.dataset_name}
    assert linked["val/nats_per_token"].step == best.step
    assert linked["val/nats_per_token"].value == pytest.approx(best.value)
    validation = [i.dataset for i in tracking.client().get_run(chain["prior"]).inputs.dataset_inputs
                  if i.tags[0].value == "validation"]
    for key in ("val/nats_per_token", "val/bits_per_dim"):
        assert (linked[key].dataset_name, linked[key].dataset_digest) == \
            (validation[0].name, validation[0].digest)
    # the input example round-trips: it is a request the model answers
    local = mlflow.artifacts.download_artifacts(uri)
    example = mlflow.models.Model.load(local).load_input_example(local)
    answer = mlflow.pyfunc.load_model(local).predict(example)
    assert list(example.columns) == ["num_samples", "seed"] and len(answer) == 1


def test_without_a_quality_step_only_the_first_version_is_champion(chain):
    name = "unranked"
    version, alias = served.register_prior(chain["prior"], name)
    assert (str(version), alias) == ("1", "champion")
    served.log_generator(chain["prior"])  # another model of the run: registered next
    version, alias = served.register_prior(chain["prior"], name)
    assert (str(version), alias) == ("2", "challenger")
    assert str(tracking.client().get_model_version_by_alias(name, "champion").version) == "1"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return labelled_csv(tmp_path_factory.mktemp("ranked"), n=40, seed=3)


def registered(csv, out, *flags):
    """A tiny pipeline registered as NAME (16 samples, 2 draws): its summary."""
    run_main(pipeline_main, ["--path_to_data", str(csv), "--out_dir", str(out), "--preset",
                             "tiny", "--experiment", "ranked", "--register", NAME,
                             "--sample.num_samples", "16", "--quality_draws", "2", *flags])
    return json.loads((out / "summary.json").read_text())


def linked_figure(summary, digest, judged_by=None):
    """The FD ratio linked to a pipeline run's prior's model on `digest`, as judged by the
    reference of that run (or of the run `judged_by`)."""
    return ranking.figure_of(ranking.logged_model_id(summary["prior_run_id"]), digest,
                             reference_of(judged_by or summary))


def reference_of(summary):
    """The fingerprint of the QualityReference a pipeline run judged its prior by."""
    return tracking.client().get_run(summary["pipeline_run_id"]).data.tags[ranking.REFERENCE_TAG]


def champion_version():
    return str(tracking.client().get_model_version_by_alias(NAME, "champion").version)


def test_champion_moves_only_to_a_better_version(store, shapes, tmp_path, capsys):
    untrained = ("--prior.max_steps", "1", "--prior.eval_every", "1")
    first = registered(shapes, tmp_path / "a", *untrained, "--system_metrics")
    assert first["registered_alias"] == "champion"  # no champion yet
    # --system_metrics reached both training stages...
    for stage in ("tokenizer_run_id", "prior_run_id"):
        logged = tracking.client().get_run(first[stage]).data.metrics
        assert any(k.startswith("system/cpu") for k in logged), stage
    # ...and the figures name the validation split they were judged on, and the model
    parent = tracking.client().get_run(first["pipeline_run_id"])
    (judged,) = [i.dataset for i in parent.inputs.dataset_inputs if i.tags[0].value == "evaluation"]
    tokenizer = tracking.client().get_run(first["tokenizer_run_id"])
    assert judged.digest in [i.dataset.digest for i in tokenizer.inputs.dataset_inputs
                             if i.tags[0].value == "validation"]
    a = linked_figure(first, judged.digest)
    assert a == pytest.approx(first["metrics"]["quality/fd_ratio"])

    trained = registered(shapes, tmp_path / "b")  # 20 steps
    assert trained["stages"]["tokenizer"] == "reuse"  # --system_metrics is no part of its key
    b = linked_figure(trained, judged.digest)
    moved = b < a  # (tiny priors: which is better is up to their figures)
    assert trained["registered_alias"] == ("champion" if moved else "challenger")
    assert champion_version() == ("2" if moved else "1")
    assert f"{b:.4f} {'beats' if moved else 'does not beat'} the champion's {a:.4f}" in \
        capsys.readouterr().err

    # the champion's recorded figure decides: unbeatable (FD ratio 0), a third version is
    # @challenger; past beating, the same third prior registered again takes @champion. A
    # figure judged by another reference (other training images or labels) is not compared.
    assert reference_of(trained) == reference_of(first)  # the same data: the same reference
    champion_model = ranking.version_model_id(
        tracking.client().get_model_version_by_alias(NAME, "champion"))
    elsewhere = tracking.create_run("quality", "ranked")
    ranking.link_figures(elsewhere, {ranking.FIGURE: 0.0}, judged, champion_model,
                         reference="another reference")
    tracking.end_run(elsewhere)
    assert ranking.figure_of(champion_model, judged.digest, "another reference") == 0.0
    assert ranking.figure_of(champion_model, judged.digest, reference_of(first)) != 0.0
    recorder = tracking.create_run("quality", "ranked")
    ranking.link_figures(recorder, {ranking.FIGURE: 0.0}, judged, champion_model,
                         reference=reference_of(first))
    tracking.end_run(recorder)
    third = registered(shapes, tmp_path / "c", "--prior.max_steps", "2")
    assert third["registered_alias"] == "challenger" and champion_version() in ("1", "2")
    assert f"does not beat the champion's {0:.4f}" in capsys.readouterr().err
    assert str(tracking.client().get_model_version_by_alias(NAME, "challenger").version) == "3"
    ranking.link_figures(recorder, {ranking.FIGURE: 1e9}, judged, champion_model,
                         reference=reference_of(first))
    again = registered(shapes, tmp_path / "d", "--prior.max_steps", "2")
    assert again["stages"]["prior"] == "reuse" and again["registered_alias"] == "champion"
    assert champion_version() == "4"

    # on other held-out images the champion has no figure: it is judged on them first, in an
    # evaluation run linked to its model, and then compared
    heldout = labelled_csv(tmp_path / "held", n=12, seed=9, name="heldout.csv")
    other = registered(shapes, tmp_path / "e", *untrained, "--heldout", str(heldout))
    assert "judging the champion" in capsys.readouterr().err
    parent = tracking.client().get_run(other["pipeline_run_id"])
    (judged,) = [i.dataset for i in parent.inputs.dataset_inputs if i.tags[0].value == "evaluation"]
    champion = linked_figure(again, judged.digest, judged_by=other)  # on other's reference
    runs = tracking.client().search_runs(
        [parent.info.experiment_id], f"tags.`pipeline.prior_run_id` = '{again['prior_run_id']}'")
    (evaluation,) = [r for r in runs if r.data.tags[tracking.STAGE_TAG] == "quality"]
    assert evaluation.data.metrics["quality/fd_ratio"] == pytest.approx(champion)
    new = linked_figure(other, judged.digest)
    assert other["registered_alias"] == ("champion" if new < champion else "challenger")


def test_system_metrics_on_a_short_training(chain, monkeypatch):
    pytest.importorskip("psutil")
    run_id = run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--max_steps", "3",
                                                "--eval_every", "3", "--system_metrics",
                                                *TINY_PRIOR])
    logged = tracking.client().get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in logged
    assert "system/system_memory_usage_megabytes" in logged


def test_system_metrics_without_psutil_is_one_line(chain, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if it were not installed
    before = len(tracking.client().search_runs([tracking.experiment_id()]))
    with pytest.raises(UserError, match="pip install psutil"):
        run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--max_steps", "3",
                                           "--system_metrics", *TINY_PRIOR])
    assert len(tracking.client().search_runs([tracking.experiment_id()])) == before
