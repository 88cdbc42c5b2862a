"""Tokenizers and priors as families, through the scripts: pixel tokenizers, conditional priors
with labels and guidance, completion figures, held-out likelihood, and a prior run made before
the families still generating."""

import math
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import quantize_dataset
import train as train_prior_script
import transformer_generation
from conftest import TINY_PRIOR, make_images, run_main, write_csv
from pipeline import tracking
from pipeline.__main__ import main as pipeline_main
from pipeline.codes import load_run_codes
from pipeline.tokenizers import load_tokenizer
from test_bad_input import bare_run, cli_error


@pytest.fixture(scope="module")
def rgb_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rgb")
    names = make_images(folder / "imgs", n=24, size=8, mode="RGB", seed=3)
    return write_csv(folder / "train.csv", [f"imgs/{n}" for n in names], header="image_path")


@pytest.fixture(scope="module")
def conditional_prior(chain):
    return run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--conditional",
                                              "--max_steps", "20", "--eval_every", "10",
                                              "--ema_decay", "0.9", *TINY_PRIOR])


def test_levels_tokenizer_interleaves_rgb_and_decodes_to_the_level_values(store, rgb_csv):
    run_id = run_main(quantize_dataset.main, ["--path_to_data", str(rgb_csv), "--pixels",
                                              "levels", "--bits", "3"])
    assert tracking.client().get_run(run_id).data.tags[tracking.TOKENIZER_TAG] == "pixels"
    codes, meta = load_run_codes(run_id)
    assert codes.shape == (24, 8, 24) and meta["values_per_pixel"] == 3 and meta["ordered"]
    image = np.array(Image.open(rgb_csv.parent / "imgs" / "img_005.png").convert("RGB"))
    expected = np.round(image / 255 * 7).astype(np.int64)  # (8, 8, 3)
    assert np.array_equal(codes[5].numpy(), expected.reshape(8, 24))  # r g b r g b ...
    tokenizer = load_tokenizer(run_id, "cpu")
    decoded = tokenizer.decode(codes[4:6])
    torch.testing.assert_close(decoded[1].permute(1, 2, 0), torch.from_numpy(expected) / 7.0)
    assert torch.equal(tokenizer.encode(decoded), codes[4:6])  # exact round trip


def test_palette_tokenizer_fits_k_colours_and_round_trips(store, rgb_csv):
    run_id = run_main(quantize_dataset.main, ["--path_to_data", str(rgb_csv), "--pixels",
                                              "palette", "--palette_size", "4"])
    codes, meta = load_run_codes(run_id)
    assert codes.shape == (24, 8, 8) and meta["codebook_size"] == 4 and not meta["ordered"]
    assert "palette.npy" in tracking.list_artifacts(run_id)
    tokenizer = load_tokenizer(run_id, "cpu")
    assert torch.equal(tokenizer.encode(tokenizer.decode(codes)), codes)
    # the synthetic images are a dark background and one bright rectangle: both get a colour
    palette = tokenizer.model.palette
    assert palette.max() > 0.8 and palette.min() < 0.15


def test_a_fitted_tokenizer_skips_an_unreadable_first_image(store, tmp_path, capsys):
    """--skip_bad_images: the broken first row is named once and left out of the fit, of the
    image size taken from the first image, and of the codes."""
    names = make_images(tmp_path / "imgs", n=12, size=8)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    csv = write_csv(tmp_path / "data.csv", ["imgs/broken.png,0"] + [f"imgs/{n},0" for n in names])
    run_id = run_main(quantize_dataset.main, ["--path_to_data", str(csv), "--tokenizer",
                                              "pixels", "--bits", "2", "--skip_bad_images"])
    codes, meta = load_run_codes(run_id)
    assert codes.shape == (12, 8, 8) and meta["rows"] == list(range(1, 13))
    assert capsys.readouterr().err.count("warning: skipping") == 1  # named once
    message = cli_error(quantize_dataset.main, ["--path_to_data", str(csv), "--tokenizer",
                                                "pixels"], capsys)
    assert "data.csv row 1" in message and "broken.png" in message


def test_a_prior_on_pixel_levels_with_the_mixture_head_generates_images(store, rgb_csv, tmp_path):
    tokenizer = run_main(quantize_dataset.main, ["--path_to_data", str(rgb_csv), "--pixels",
                                                 "levels", "--bits", "2"])
    prior = run_main(train_prior_script.main, ["--run_id", tokenizer, "--head", "mixture",
                                               "--mixtures", "2", "--max_steps", "4", *TINY_PRIOR])
    metrics = tracking.client().get_run(prior).data.metrics
    # every value of the 8x8x3 image is scored: bits/dim = nats per token / ln 2 here
    assert metrics["val/bits_per_dim"] == pytest.approx(metrics["val/nats_per_token"] / math.log(2))
    run_main(transformer_generation.main, ["--run_id", prior, "--num_samples", "3",
                                           "--out_dir", str(tmp_path)])
    first = Image.open(tmp_path / "sample_0000.png")
    assert first.size == (8, 8) and first.mode == "RGB"


def test_conditional_prior_draws_one_sample_per_listed_label(chain, conditional_prior):
    run = tracking.client().get_run(conditional_prior)
    assert run.data.params["conditional"] == "True"
    run_main(transformer_generation.main, ["--run_id", conditional_prior, "--labels", "2,0,2",
                                           "--guidance", "2", "--name", "labelled", "--no_decode"])
    record = tracking.load_json_artifact(conditional_prior, "generated/labelled.json")
    assert record["labels"] == ["2", "0", "2"] and record["guidance"] == 2
    assert record["num_samples"] == 3
    run_main(transformer_generation.main, ["--run_id", conditional_prior, "--labels", "all",
                                           "--num_samples", "5", "--name", "all", "--no_decode"])
    assert tracking.load_json_artifact(conditional_prior, "generated/all.json")["labels"] == \
        ["0", "1", "2", "0", "1"]


def test_label_and_guidance_errors(chain, conditional_prior, capsys):
    assert "unknown label '7'; the prior knows 0, 1, 2" in cli_error(
        transformer_generation.main, ["--run_id", conditional_prior, "--labels", "1,7"], capsys)
    assert "trained without --conditional" in cli_error(
        transformer_generation.main, ["--run_id", chain["prior"], "--labels", "1"], capsys)
    assert "--guidance needs a prior trained with --conditional" in cli_error(
        transformer_generation.main, ["--run_id", chain["prior"], "--guidance", "2"], capsys)
    assert "--temperature must be >= 0" in cli_error(
        transformer_generation.main, ["--run_id", chain["prior"], "--temperature", "-1"], capsys)


def test_conditional_flag_on_unlabelled_codes_is_an_error(store, rgb_csv, capsys):
    tokenizer = run_main(quantize_dataset.main, ["--path_to_data", str(rgb_csv), "--pixels",
                                                 "palette", "--palette_size", "3"])
    before = len(tracking.client().search_runs([tracking.experiment_id()]))
    message = cli_error(train_prior_script.main, ["--run_id", tokenizer, "--conditional",
                                                  *TINY_PRIOR], capsys)
    assert "has no labels (its CSV had no `label` column, or its folder no class" in message
    assert len(tracking.client().search_runs([tracking.experiment_id()])) == before


def test_completion_figure_keeps_the_top_codes_and_is_logged(chain, tmp_path):
    out = tmp_path / "completions"
    run_main(transformer_generation.main, ["--run_id", chain["prior"], "--complete",
                                           str(chain["csv"]), "--keep", "top",
                                           "--num_completions", "3", "--max_images", "2",
                                           "--name", "halves", "--out_dir", str(out)])
    figure = Image.open(out / "completions.png")
    assert figure.size[0] > figure.size[1]  # 2 rows of input | 3 completions | original
    codes, _ = load_run_codes(chain["vqvae"], "train")
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(chain["prior"], "completions/halves/codes.npy", tmp)
        drawn = np.load(path)
    assert drawn.shape == (2, 3, 4, 4)
    for image in range(2):
        for k in range(3):  # the top half of the 4x4 grid is the image's own codes
            assert np.array_equal(drawn[image, k, :2], codes[image, :2].numpy())
    assert len(list(out.glob("completion_*.png"))) == 6
    images = tracking.client().list_artifacts(chain["prior"], "completions/halves")
    assert any(a.path.endswith("figure.png") for a in images)


def test_completion_picks_rows_by_index_or_at_random(chain, capsys):
    from pipeline.complete import complete, pick_rows
    codes, _ = load_run_codes(chain["vqvae"], "train")  # the CSV's 48 images, in its order
    tokens, _, _, _ = complete(chain["prior"], chain["csv"], index="3-5,10", num_completions=1,
                               name="picked")
    assert torch.equal(tokens, codes[[3, 4, 5, 10]])
    record = tracking.load_json_artifact(chain["prior"], "completions/picked/settings.json")
    assert record["rows"] == [3, 4, 5, 10] and record["index"] == "3-5,10"
    drawn = pick_rows(48, "train.csv", random=5, seed=1)
    assert drawn == pick_rows(48, "train.csv", random=5, seed=1) == sorted(set(drawn))
    assert drawn != pick_rows(48, "train.csv", random=5, seed=2)
    assert pick_rows(48, "train.csv") == list(range(8))  # the default: the first --max_images
    tokens, _, _, _ = complete(chain["prior"], chain["csv"], random=5, seed=1, num_completions=1,
                               name="random")
    assert torch.equal(tokens, codes[drawn])
    assert tracking.load_json_artifact(chain["prior"],
                                       "completions/random/settings.json")["rows"] == drawn
    complete_csv = ["--run_id", chain["prior"], "--complete", str(chain["csv"])]
    assert cli_error(transformer_generation.main, [*complete_csv, "--index", "0-2,x"],
                     capsys) == "error: --index: 'x' is not a row or a range of rows (e.g. " \
                                "--index 0-10,15)"
    assert cli_error(transformer_generation.main, [*complete_csv, "--index", "40-48"],
                     capsys) == f"error: --index: row 48 is out of range: {chain['csv']} has " \
                                f"48 rows (0..47)"
    assert "--random must be in 1..48" in cli_error(transformer_generation.main,
                                                    [*complete_csv, "--random", "49"], capsys)


def test_completion_errors(chain, capsys):
    assert "raster prefix only" in cli_error(transformer_generation.main, [
        "--run_id", chain["prior"], "--complete", str(chain["csv"]), "--keep", "left"], capsys)
    assert "--keep must be top, left, center or random:P" in cli_error(
        transformer_generation.main, ["--run_id", chain["prior"], "--complete",
                                      str(chain["csv"]), "--keep", "bottom"], capsys)
    assert "--steps is for the absorbing prior" in cli_error(
        transformer_generation.main, ["--run_id", chain["prior"], "--steps", "4"], capsys)


def test_evaluate_logs_bits_per_dim_and_a_per_image_table(chain, conditional_prior):
    for run_id in (chain["prior"], conditional_prior):
        run_main(pipeline_main, ["evaluate", "--run_id", run_id, "--path_to_data",
                                 str(chain["csv"]), "--name", "heldout"])
        metrics = tracking.client().get_run(run_id).data.metrics
        with tempfile.TemporaryDirectory() as tmp:
            table = __import__("pandas").read_csv(
                tracking.download_artifact(run_id, "eval/heldout.csv", tmp))
        assert len(table) == 48 and list(table["row"][:2]) == [1, 2]
        assert metrics["eval/heldout/bits_per_dim"] == pytest.approx(table["bits_per_dim"].mean())
        # 16 codes of at most log2(16) bits each, over 16x16 grey pixels
        assert 0 < metrics["eval/heldout/bits_per_dim"] < 16 * 4 / 256


def test_a_prior_run_made_before_the_families_still_generates(chain, tmp_path):
    """Runs of the first version: stage `transformer`, tag `pipeline.vqvae_run_id`, a
    checkpoint of kind `transformer` whose output layer was called `head`."""
    from pipeline.checkpoint import save_checkpoint
    from transformer.gpt import GPT, GPTConfig
    config = {"vocab_size": 16, "grid_h": 4, "grid_w": 4, "n_layer": 1, "n_head": 2,
              "n_embd": 32, "dropout": 0.0, "window_size": None}
    weights = GPT(GPTConfig(**config)).state_dict()
    weights["head.weight"] = weights.pop("head_proj.weight")
    run_id = bare_run("transformer", {tracking.VQVAE_RUN_TAG: chain["vqvae"]})
    save_checkpoint({"kind": "transformer", "config": config, "model": weights, "step": 1,
                     "vqvae": {"vqvae_run_id": chain["vqvae"]}}, tmp_path / "best.pt")
    tracking.log_artifact(run_id, tmp_path / "best.pt", "checkpoints")
    run_main(transformer_generation.main, ["--run_id", run_id, "--num_samples", "2",
                                           "--out_dir", str(tmp_path / "out")])
    assert len(list((tmp_path / "out").glob("sample_*.png"))) == 2
