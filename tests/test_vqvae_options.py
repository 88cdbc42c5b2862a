"""VQ-VAE training options: gradient accumulation and the adversarial loss."""

import copy
import tempfile

import pytest
import torch

import train_vqvae
from conftest import TINY_VQVAE, run_main
from pipeline import tracking
from pipeline.checkpoint import load_checkpoint
from pipeline.distributed import Context
from core.errors import UserError
from vqvae.discriminator import DiscriminatorConfig, PatchDiscriminator, adaptive_weight
from vqvae.model import VQVAE, VQVAEConfig
from vqvae.quantizer import VectorQuantizer
from pipeline.train_tokenizer import TrainConfig, train_step


def steps_with(model, accumulate, batches):
    """Train `model` one optimizer step per batch; -> the last step's logged values."""
    train = TrainConfig(batch_size=len(batches[0]), accumulate=accumulate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    model.quantizer.defer_updates = accumulate > 1
    for step, images in enumerate(batches):
        logs = train_step(model, model, optimizer, scaler, images, train, Context(), "test",
                          step, 3e-3)
    return logs


def test_two_micro_batches_take_the_same_steps_as_one_batch():
    """Gradients of two half-batch means, halved and summed, are the whole batch's gradient.
    The codebook is frozen (decay 1, no restarts): under accumulation its EMA step comes after
    both micro-batches, without it inside the forward, which changes what the decoder sees
    (the test below checks the EMA statistics themselves)."""
    config = VQVAEConfig(in_channels=1, image_size=16, channels=16, downsample=4,
                         n_res_blocks=1, codebook_size=16, code_dim=8, ema_decay=1.0,
                         dead_code_threshold=0.0)
    torch.manual_seed(0)
    batches = [torch.rand(8, 1, 16, 16) for _ in range(3)]
    model = VQVAE(config)
    model(batches[0])  # k-means start, then the (idempotent with decay 1) codebook update
    whole, halves = copy.deepcopy(model), copy.deepcopy(model)
    logs_whole = steps_with(whole, 1, batches)
    logs_halves = steps_with(halves, 2, batches)
    torch.testing.assert_close(logs_halves["train/vq_loss"], logs_whole["train/vq_loss"])
    moved = 0
    for (name, a), b, start in zip(whole.state_dict().items(), halves.state_dict().values(),
                                   model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(a, start)
    assert moved > 10  # the weights did train


def test_deferred_codebook_update_of_two_halves_equals_one_update_of_the_whole():
    def quantizer():
        q = VectorQuantizer(8, 4, dead_code_threshold=0.0).train()
        q.codebook.copy_(torch.linspace(-1, 1, 32).view(8, 4))
        q.ema_sum.copy_(q.codebook)
        q.initialized.fill_(True)
        return q
    z = torch.randn(8, 4, 3, 3)
    whole, halves = quantizer(), quantizer()
    whole(z)
    halves.defer_updates = True
    before = halves.codebook.clone()
    halves(z[:4])
    _, _, second = halves(z[4:])
    assert torch.equal(halves.codebook, before)  # both micro-batches see one codebook
    assert torch.equal(second, quantizer().indices(z[4:]))
    halves.apply_deferred_update()
    for name in ("codebook", "ema_count", "ema_sum"):
        torch.testing.assert_close(getattr(halves, name), getattr(whole, name), msg=name)


def test_adaptive_weight_is_the_ratio_of_the_gradient_norms():
    last = torch.nn.Parameter(torch.randn(3))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 0.5, 0.0])
    weight = adaptive_weight((last * a).sum(), (last * b).sum(), last)
    assert weight.item() == pytest.approx(5.0 / (0.5 + 1e-4))
    assert not weight.requires_grad
    huge = adaptive_weight((last * a).sum(), (last * 0).sum(), last)  # no adversarial gradient
    assert huge.item() == pytest.approx(1e4)  # clamped


def test_patch_discriminator_judges_each_image_on_its_own():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(DiscriminatorConfig(in_channels=3, channels=8))
    x, y = torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16)
    together = discriminator(torch.cat([x, y]))
    assert together.shape == (5, 1, 2, 2)  # a grid of patch logits
    torch.testing.assert_close(together[:2], discriminator(x))  # no batch statistics


def download_checkpoint(run_id):
    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(tracking.download_artifact(run_id, "checkpoints/last.pt", tmp),
                               "vqvae")


def test_adversarial_training_logs_saves_and_resumes_its_discriminator(store, image_csv,
                                                                       tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_id = run_main(train_vqvae.main, [
        "--path_to_data", str(image_csv), *TINY_VQVAE, "--max_steps", "20", "--eval_every", "10",
        "--checkpoint_every", "10", "--adversarial_weight", "0.5", "--adversarial_start", "10",
        "--discriminator_channels", "8", "--accumulate", "2"])
    history = lambda key: [m.step for m in tracking.client().get_metric_history(run_id, key)]
    for key in ("train/discriminator_loss", "train/generator_loss", "train/adaptive_weight",
                "train/logits_real", "train/logits_fake"):
        assert history(key) == [20], key  # logged once the discriminator has started
    assert history("train/vq_loss") == [10, 20]
    checkpoint = download_checkpoint(run_id)
    state = checkpoint["discriminator"]
    assert state["config"] == {"in_channels": 1, "channels": 8, "n_layers": 2}
    assert checkpoint["train"]["adversarial_weight"] == 0.5
    discriminator_steps = lambda state: state["optimizer"]["state"][0]["step"].item()
    assert discriminator_steps(state) == 10  # steps 10..19

    run_main(train_vqvae.main, ["--resume_run_id", run_id, "--max_steps", "30"])
    resumed = download_checkpoint(run_id)
    assert resumed["step"] == 30
    assert discriminator_steps(resumed["discriminator"]) == 20  # continued, not restarted


def test_without_the_option_nothing_adversarial_happens(chain):
    checkpoint = download_checkpoint(chain["vqvae"])
    assert "discriminator" not in checkpoint
    metrics = tracking.client().get_run(chain["vqvae"]).data.metrics
    assert "train/vq_loss" in metrics and "train/discriminator_loss" not in metrics


@pytest.mark.parametrize("flags, match", [
    (["--accumulate", "3"], "--accumulate 3 must be at least 1 and split"),
    (["--accumulate", "0"], "--accumulate 0 must be at least 1"),
    (["--adversarial_weight", "0.1", "--adversarial_start", "1", "--discriminator_layers", "3"],
     "--discriminator_layers 3 is too many for 16x16 images"),
    (["--adversarial_weight", "-1"], "must not be negative"),
    (["--adversarial_weight", "0.1"], "--adversarial_start 1000 is not before --max_steps 2"),
])
def test_bad_training_options_are_one_line_errors(store, image_csv, flags, match):
    with pytest.raises(UserError, match=match):
        train_vqvae.main(["--path_to_data", str(image_csv), *TINY_VQVAE, "--max_steps", "2",
                          "--experiment", "bad-options", *flags])
    assert tracking.client().get_experiment_by_name("bad-options") is None  # no run created
