"""Training runs end to end against an MLflow store in a temp folder."""

import tempfile

import torch

import train as train_prior_script
import train_vqvae
from conftest import TINY_PRIOR, TINY_VQVAE, run_main
from pipeline import tracking
from pipeline.checkpoint import load_checkpoint
from pipeline.runs import load_run_checkpoint
from image_tokenizers import from_checkpoint as tokenizer_from_checkpoint


def metric_history(run_id, key):
    return [(m.step, m.value) for m in tracking.client().get_metric_history(run_id, key)]


def download_checkpoint(run_id, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(run_id, f"checkpoints/{name}", tmp)
        return load_checkpoint(path, "vqvae")


def test_short_vqvae_training_lowers_the_loss_and_logs_everything(chain):
    run_id = chain["vqvae"]
    run = tracking.client().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.STAGE_TAG] == "tokenizer"
    assert run.data.tags[tracking.TOKENIZER_TAG] == "vqvae"
    assert run.data.params["codebook_size"] == "16" and run.data.params["in_channels"] == "1"
    losses = [v for _, v in metric_history(run_id, "train/vq_loss")]
    assert losses[-1] < 0.8 * losses[0]  # the first value is logged at step 10
    for key in ("val/pixel_mse", "val/psnr_db", "val/codebook_usage", "val/codebook_perplexity",
                "train/images_per_sec"):
        history = metric_history(run_id, key)
        assert history, key
    assert [s for s, _ in metric_history(run_id, "val/psnr_db")] == [40, 80]
    usage = metric_history(run_id, "val/codebook_usage")[-1][1]
    assert 0 < usage <= 1
    artifacts = tracking.list_artifacts(run_id) + tracking.list_artifacts(run_id, "checkpoints")
    assert "config.json" in artifacts
    assert {"checkpoints/last.pt", "checkpoints/best.pt"} <= set(artifacts)
    images = tracking.list_artifacts(run_id, "images")
    assert any("reconstructions" in p for p in images), images
    config = tracking.load_json_artifact(run_id, "config.json")
    assert config["model"]["codebook_size"] == 16 and config["train"]["max_steps"] == 80


def test_checkpoint_alone_rebuilds_a_model_better_than_untrained(chain):
    from pipeline.images import ImageData, read_table
    from vqvae.model import VQVAE, VQVAEConfig
    checkpoint = download_checkpoint(chain["vqvae"], "last.pt")
    assert checkpoint["step"] == 80 and "optimizer" in checkpoint
    trained = tokenizer_from_checkpoint(checkpoint)
    images = next(ImageData(read_table(chain["csv"]), 1, 16).ordered(range(48), 48)).float() / 255
    untrained = VQVAE(VQVAEConfig(**checkpoint["config"]))
    untrained(images)  # k-means init only
    untrained.eval()
    error = lambda model: (model(images)[0].clamp(0, 1) - images).pow(2).mean()
    assert error(trained) < 0.5 * error(untrained)
    assert trained.encode(images).shape == (48, 4, 4)


def test_resume_continues_the_same_run_with_its_settings(store, image_csv):
    args = ["--path_to_data", str(image_csv), "--max_steps", "20", "--eval_every", "10",
            "--checkpoint_every", "10", *TINY_VQVAE]
    run_id = run_main(train_vqvae.main, args)
    assert download_checkpoint(run_id, "last.pt")["step"] == 20
    # resume with nothing but the run id and a longer horizon
    resumed = run_main(train_vqvae.main, ["--resume_run_id", run_id, "--max_steps", "30"])
    assert resumed == run_id
    checkpoint = download_checkpoint(run_id, "last.pt")
    assert checkpoint["step"] == 30 and checkpoint["train"]["batch_size"] == 16
    steps = [s for s, _ in metric_history(run_id, "train/vq_loss")]
    assert steps == sorted(steps) and steps[-1] == 30 and 20 in steps
    assert tracking.client().get_run(run_id).info.status == "FINISHED"


def test_split_seed_keeps_the_rows_while_seed_draws_another_prior(chain):
    """--split_seed holds the train/validation rows (an ensemble's members must share them)
    while --seed draws another initialisation; without it, --seed also re-draws the rows."""
    def prior(*flags):
        run_id = run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--max_steps", "2",
                                                    "--eval_every", "2", *TINY_PRIOR, *flags])
        run = tracking.client().get_run(run_id)
        digests = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
        weights = load_run_checkpoint(run_id, "prior", "prior")["model"]
        return digests, weights

    base = prior("--seed", "0")
    held = prior("--seed", "3", "--split_seed", "0")
    redrawn = prior("--seed", "3")
    assert held[0] == base[0]  # the same rows
    assert redrawn[0]["validation"] != base[0]["validation"]
    assert not torch.equal(held[1]["token_embedding.weight"], base[1]["token_embedding.weight"])
