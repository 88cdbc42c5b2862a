"""`python -m pipeline quality` (its figures against the pipeline's: tests/test_pipeline.py)."""

import pytest

from conftest import write_csv
from conftest import run_main
from core.errors import UserError
from pipeline import tracking
from pipeline.__main__ import main as pipeline_main


def test_a_missing_reference_csv_is_one_line(store, chain, tmp_path, monkeypatch):
    heldout = write_csv(tmp_path / "heldout.csv",
                        [f"{chain['csv'].parent}/imgs/img_{i:03d}.png,0" for i in range(24)])
    args = ["quality", "--run_id", chain["prior"], "--path_to_data", str(heldout)]
    with pytest.raises(UserError, match="gone.csv: no such CSV file"):
        run_main(pipeline_main, args + ["--train_csv", str(tmp_path / "gone.csv")])
    monkeypatch.chdir(tmp_path)  # the path the tokenizer run recorded is not found from here
    recorded = tracking.load_json_artifact(chain["vqvae"], "config.json")["train"]["path_to_data"]
    if not recorded.startswith("/"):
        with pytest.raises(UserError, match="give --train_csv"):
            run_main(pipeline_main, args)


def test_the_printed_line_names_every_figure_it_has():
    from pipeline.quality_run import summary_line
    figures = {"fd_ratio": 1.2, "precision": 0.8, "recall": 0.7, "nn_ratio": 1.1,
               "classifier_confidence": 0.91, "label_agreement": 0.95}
    line = summary_line(figures)
    assert "classifier confidence 0.910" in line and "recognised in 0.950" in line
    assert "confidence" not in summary_line({k: v for k, v in figures.items()
                                             if k not in ("classifier_confidence",
                                                          "label_agreement")})
