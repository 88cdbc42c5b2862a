"""CSV -> VQ-VAE -> codes -> prior -> samples -> PNGs, all by run id, with lineage checked."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import images_from_indexes
import train as train_prior_script
import transformer_generation
from conftest import ROOT, TINY_PRIOR, run_main
from pipeline import tracking
from pipeline.codes import load_run_codes
from pipeline.images import file_sha256


def test_quantize_logs_codes_in_row_order_with_metadata(chain):
    codes, meta = load_run_codes(chain["vqvae"], "train")
    assert codes.shape == (48, 4, 4) and codes.max() < 16
    assert meta["codebook_size"] == 16 and meta["grid"] == [4, 4]
    assert meta["image_size"] == 16 and meta["in_channels"] == 1
    assert meta["tokenizer_run_id"] == chain["vqvae"] and meta["tokenizer"] == "vqvae"
    assert meta["csv_sha256"] == file_sha256(chain["csv"])
    assert meta["labels"] == [i % 3 for i in range(48)]


def test_quantized_codes_match_encoding_each_image_alone(chain):
    import torch
    from pipeline.images import decode_image
    from pipeline.runs import load_run_checkpoint
    from image_tokenizers import from_checkpoint as tokenizer_from_checkpoint
    model = tokenizer_from_checkpoint(load_run_checkpoint(chain["vqvae"], "tokenizer", "vqvae"))
    codes, meta = load_run_codes(chain["vqvae"], "train")
    path = chain["csv"].parent / "imgs" / "img_007.png"
    alone = model.encode(torch.from_numpy(decode_image(path, 1, 16))[None].float() / 255)
    assert torch.equal(alone[0], codes[7])


def test_prior_run_records_stage_lineage_and_metrics(chain):
    run = tracking.client().get_run(chain["prior"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.STAGE_TAG] == "prior"
    assert run.data.tags[tracking.PRIOR_TAG] == "gpt"
    assert run.data.tags[tracking.TOKENIZER_RUN_TAG] == chain["vqvae"]
    metrics = run.data.metrics
    assert {"train/nats_per_token", "val/nats_per_token", "val/bits_per_dim",
            "train/tokens_per_sec"} <= set(metrics)
    # bits/dim = nats per code * codes per image / (dims per image * ln 2)
    assert metrics["val/bits_per_dim"] == pytest.approx(
        metrics["val/nats_per_token"] * 16 / (16 * 16 * np.log(2)), rel=1e-6)
    assert metrics["val/nats_per_token"] < np.log(16)  # better than uniform over the codebook
    generated = tracking.list_artifacts(chain["prior"], "generated")
    assert "generated/first.npy" in generated and "generated/first.json" in generated


def test_generate_decodes_to_pngs_and_logs_them(chain, tmp_path):
    out = tmp_path / "samples"
    run_main(transformer_generation.main, ["--run_id", chain["prior"], "--num_samples", "5",
                                           "--batch_size", "2", "--top_k", "8", "--seed", "3",
                                           "--name", "decoded", "--out_dir", str(out)])
    pngs = sorted(out.glob("sample_*.png"))
    assert len(pngs) == 5 and (out / "grid.png").is_file()
    assert Image.open(pngs[0]).size == (16, 16) and Image.open(pngs[0]).mode == "L"
    logged = tracking.list_artifacts(chain["prior"], "samples/decoded")
    assert len(logged) == 5
    assert tracking.client().get_run(chain["prior"]).data.tags["pipeline.latest_generated"] == "decoded"


def test_same_seed_same_samples(chain):
    from pipeline.generate import generate
    a = generate(chain["prior"], 4, seed=11, no_decode=True, name="seed_a").codes
    b = generate(chain["prior"], 4, seed=11, no_decode=True, name="seed_b").codes
    c = generate(chain["prior"], 4, seed=12, no_decode=True, name="seed_c").codes
    assert (a == b).all() and not (a == c).all()


def test_images_from_indexes_by_run_and_by_local_file(chain, tmp_path):
    run_main(images_from_indexes.main, ["--run_id", chain["prior"], "--indexes", "first",
                                        "--out_dir", str(tmp_path / "by_run")])
    assert len(list((tmp_path / "by_run").glob("sample_*.png"))) == 6
    codes = np.random.default_rng(0).integers(0, 16, (3, 4, 4)).astype(np.int64)
    np.save(tmp_path / "mine.npy", codes)
    run_main(images_from_indexes.main, ["--tokenizer_run_id", chain["vqvae"], "--indexes_path",
                                        str(tmp_path / "mine.npy"), "--out_dir",
                                        str(tmp_path / "by_file")])
    assert len(list((tmp_path / "by_file").glob("sample_*.png"))) == 3


def test_prior_from_a_local_codes_file(store, tmp_path):
    codes = np.random.default_rng(0).integers(0, 10, (40, 3, 3)).astype(np.uint16)
    np.save(tmp_path / "codes.npy", codes)
    run_id = run_main(train_prior_script.main, ["--path_to_data", str(tmp_path / "codes.npy"),
                                                "--codebook_size", "10", "--max_steps", "5",
                                                *TINY_PRIOR])
    run = tracking.client().get_run(run_id)
    assert tracking.TOKENIZER_RUN_TAG not in run.data.tags
    assert "val/nats_per_token" in run.data.metrics


def test_scripts_print_run_id_last_as_real_processes(chain, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "transformer_generation.py"),
                             "--run_id", chain["prior"], "--num_samples", "2", "--no_decode"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"run_id={chain['prior']}"
