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
