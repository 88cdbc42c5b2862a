"""VQ-VAE options: gradient accumulation, the adversarial loss, the weight average, flips, the
VQGAN layout (GroupNorm, attention, channel multipliers) and 16x downsampling."""

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import quantize_dataset
import train_vqvae
from conftest import TINY_VQVAE, run_main
from core.config import build
from image_tokenizers import from_checkpoint
from pipeline import tracking, train_tokenizer
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.distributed import Context
from pipeline.tokenizers import load_tokenizer
from core.errors import UserError
from vqvae.discriminator import DiscriminatorConfig, PatchDiscriminator, adaptive_weight
from vqvae.model import VQVAE, VQVAEConfig
from vqvae.quantizer import VectorQuantizer
from pipeline.train_tokenizer import TrainConfig, random_hflip, train_step


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
                         n_res_blocks=1, codebook_size=16, code_dim=8, codebook_decay=1.0,
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


# the layouts

# The default config's state dict as it was before the layout options (names and shapes): old
# checkpoints must keep loading into the default model.
DEFAULT_STATE = [
    ("encoder.net.0.weight", (64, 3, 3, 3)), ("encoder.net.0.bias", (64,)),
    ("encoder.net.2.weight", (64, 64, 4, 4)), ("encoder.net.2.bias", (64,)),
    ("encoder.net.4.weight", (64, 64, 4, 4)), ("encoder.net.4.bias", (64,)),
    ("encoder.net.5.conv3.weight", (64, 64, 3, 3)), ("encoder.net.5.conv3.bias", (64,)),
    ("encoder.net.5.conv1.weight", (64, 64, 1, 1)), ("encoder.net.5.conv1.bias", (64,)),
    ("encoder.net.6.conv3.weight", (64, 64, 3, 3)), ("encoder.net.6.conv3.bias", (64,)),
    ("encoder.net.6.conv1.weight", (64, 64, 1, 1)), ("encoder.net.6.conv1.bias", (64,)),
    ("encoder.net.8.weight", (64, 64, 1, 1)), ("encoder.net.8.bias", (64,)),
    ("quantizer.codebook", (512, 64)), ("quantizer.ema_count", (512,)),
    ("quantizer.ema_sum", (512, 64)), ("quantizer.initialized", ()),
    ("decoder.net.0.weight", (64, 64, 3, 3)), ("decoder.net.0.bias", (64,)),
    ("decoder.net.1.conv3.weight", (64, 64, 3, 3)), ("decoder.net.1.conv3.bias", (64,)),
    ("decoder.net.1.conv1.weight", (64, 64, 1, 1)), ("decoder.net.1.conv1.bias", (64,)),
    ("decoder.net.2.conv3.weight", (64, 64, 3, 3)), ("decoder.net.2.conv3.bias", (64,)),
    ("decoder.net.2.conv1.weight", (64, 64, 1, 1)), ("decoder.net.2.conv1.bias", (64,)),
    ("decoder.net.4.weight", (64, 64, 4, 4)), ("decoder.net.4.bias", (64,)),
    ("decoder.net.6.weight", (64, 64, 4, 4)), ("decoder.net.6.bias", (64,)),
    ("decoder.net.8.weight", (3, 64, 3, 3)), ("decoder.net.8.bias", (3,)),
]


def test_the_default_layout_is_the_model_of_before():
    state = VQVAE(VQVAEConfig()).state_dict()
    assert [(name, tuple(value.shape)) for name, value in state.items()] == DEFAULT_STATE
    # all-1 multipliers spelt out are the default
    torch.manual_seed(0)
    default = VQVAE(VQVAEConfig(channels=8, code_dim=4, codebook_size=8))
    torch.manual_seed(0)
    spelt = VQVAE(VQVAEConfig(channels=8, code_dim=4, codebook_size=8, channel_mult="1,1,1"))
    for (name, a), b in zip(default.state_dict().items(), spelt.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("options, grid, image_size", [
    ({"attn_resolutions": "4"}, 4, 16),                     # attention at the code grid
    ({"channel_mult": "1,2,4"}, 4, 16),
    ({"block": "vqgan"}, 4, 16),
    ({"block": "vqgan", "channel_mult": "1,2,2", "attn_resolutions": "8,4"}, 4, 16),
    ({"downsample": 16}, 2, 32),
    ({"block": "vqgan", "downsample": 16, "channel_mult": "1,1,2,2,4",
      "attn_resolutions": "2"}, 2, 32),
])
def test_each_layout_trains_a_step_and_codes_images(options, grid, image_size):
    config = VQVAEConfig(**{"in_channels": 1, "image_size": image_size, "channels": 8,
                            "n_res_blocks": 1, "codebook_size": 16, "code_dim": 4, **options})
    torch.manual_seed(0)
    model = VQVAE(config)
    images = torch.rand(4, 1, image_size, image_size)
    before = copy.deepcopy(model.encoder.net[0].weight)
    logs = steps_with(model, 1, [images])
    assert torch.isfinite(logs["train/vq_loss"])
    assert not torch.equal(model.encoder.net[0].weight, before)  # the gradient got through
    model.eval()
    codes = model.encode(images)
    assert codes.shape == (4, grid, grid) and model.grid == (grid, grid)
    assert model.decode(codes).shape == (4, 1, image_size, image_size)


def test_the_vqgan_layout_has_its_blocks_where_asked():
    from vqvae.model import AttentionBlock, ResnetBlock
    config = VQVAEConfig(in_channels=1, image_size=16, channels=8, n_res_blocks=2,
                         block="vqgan", channel_mult="1,2,4", attn_resolutions="4")
    model = VQVAE(config)
    count = lambda net, kind: sum(isinstance(layer, kind) for layer in net)
    # 2 per level at 3 levels, + 2 in the middle; attention after the 2 at 4x4 and in the middle
    assert count(model.encoder.net, ResnetBlock) == 8
    assert count(model.encoder.net, AttentionBlock) == 3
    assert count(model.decoder.net, AttentionBlock) == 3
    widths = [layer.conv1.out_channels for layer in model.encoder.net
              if isinstance(layer, ResnetBlock)]
    assert widths == [8, 8, 16, 16, 32, 32, 32, 32]
    assert model.run_name() == "vqvae f4 K512 16px vqgan"


@pytest.mark.parametrize("options, match", [
    ({"downsample": 32, "image_size": 64}, "--downsample must be 2, 4, 8 or 16"),
    ({"downsample": 16, "image_size": 24}, "--image_size 24 is not divisible by --downsample 16"),
    ({"channel_mult": "1,2"}, "--channel_mult needs 3 positive entries"),
    ({"channel_mult": "1,0,2"}, "--channel_mult needs 3 positive entries"),
    ({"channel_mult": "1;2;2"}, "--channel_mult must be a comma list of integers"),
    ({"attn_resolutions": "8"}, "8 is not a resolution with residual blocks in --block vqvae"),
    ({"attn_resolutions": "6", "block": "vqgan"}, "one of 16, 8, 4"),
    ({"block": "taming"}, "--block must be one of vqvae, vqgan"),
])
def test_bad_layout_options_are_one_line_errors(options, match):
    with pytest.raises(UserError, match=match):
        VQVAE(VQVAEConfig(**{"in_channels": 1, "image_size": 16, **options}))


# the codebook's decay and the weights' average

def test_a_checkpoint_from_before_the_rename_keeps_its_codebook_decay(tmp_path):
    """Checkpoints and config.json files written before had the codebook's rate as `ema_decay`
    in the model config."""
    config = VQVAEConfig(in_channels=1, image_size=16, channels=8, n_res_blocks=1,
                         codebook_size=16, code_dim=4, codebook_decay=0.9)
    torch.manual_seed(0)
    model = VQVAE(config)
    model(torch.rand(8, 1, 16, 16))  # the k-means start
    old_config = {key: value for key, value in vars(config).items()
                  if key not in ("codebook_decay", "block", "channel_mult", "attn_resolutions")}
    old_config["ema_decay"] = 0.9
    save_checkpoint({"kind": "vqvae", "config": old_config, "model": model.state_dict(),
                     "step": 10}, tmp_path / "old.pt")
    loaded = from_checkpoint(load_checkpoint(tmp_path / "old.pt", "vqvae"))
    assert loaded.config.codebook_decay == 0.9 and loaded.quantizer.decay == 0.9
    images = torch.rand(5, 1, 16, 16)
    assert torch.equal(loaded.encode(images), model.eval().encode(images))
    torch.testing.assert_close(loaded.decode(loaded.encode(images)),
                               model.decode(model.encode(images)), rtol=0, atol=0)
    # the resume path builds the config the same way; a new key wins over an old one
    assert build(VQVAEConfig, old_config).codebook_decay == 0.9
    assert build(VQVAEConfig, {"ema_decay": 0.9, "codebook_decay": 0.8}).codebook_decay == 0.8


def test_the_weight_average_is_what_the_run_evaluates_saves_and_quantizes(
        store, image_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shown = []  # the models whose reconstructions the run logs
    original = train_tokenizer.log_reconstructions
    monkeypatch.setattr(train_tokenizer, "log_reconstructions", lambda run, model, preview, step:
                        (shown.append((step, copy.deepcopy(model.state_dict()))),
                         original(run, model, preview, step)))
    run_id = run_main(train_vqvae.main, [
        "--path_to_data", str(image_csv), *TINY_VQVAE, "--max_steps", "6", "--eval_every", "6",
        "--checkpoint_every", "6", "--ema_decay", "0.9"])
    assert "--ema_decay 0.9 averages the VQ-VAE's weights" in capsys.readouterr().err
    checkpoint = download_checkpoint(run_id)
    average, trained = checkpoint["ema"], checkpoint["model"]
    assert checkpoint["train"]["ema_decay"] == 0.9
    assert checkpoint["config"]["codebook_decay"] == 0.99  # the codebook's rate is untouched
    name = "encoder.net.0.weight"
    assert not torch.equal(average[name], trained[name])
    assert [step for step, _ in shown] == [0, 6]
    torch.testing.assert_close(shown[-1][1][name], average[name])  # reconstructions: the average
    tokenizer = load_tokenizer(run_id, "cpu")
    torch.testing.assert_close(tokenizer.model.state_dict()[name], average[name])

    run_main(quantize_dataset.main, ["--run_id", run_id])
    with tempfile.TemporaryDirectory() as tmp:
        codes = np.load(tracking.download_artifact(run_id, f"codes/{Path(image_csv).stem}.npy",
                                                   tmp))
    images = torch.cat(list(tokenizer_images(image_csv)))
    assert np.array_equal(codes, tokenizer.model.encode(images).numpy())
    trained_model = from_checkpoint(checkpoint, averaged=False)
    assert not torch.equal(trained_model.state_dict()[name], average[name])


def tokenizer_images(csv):
    from pipeline.images import read_source
    data = read_source(str(csv)).images(1, 16)
    return (batch.float() / 255 for batch in data.ordered(range(len(data)), 64))


# flips

def test_random_hflip_mirrors_about_half_of_the_images():
    images = torch.rand(64, 1, 4, 4)
    flipped = random_hflip(images, torch.Generator().manual_seed(0))
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 16 < int(mirrored.sum()) < 48
    again = random_hflip(images, torch.Generator().manual_seed(0))
    assert torch.equal(again, flipped)  # seeded: a resumed run flips what it would have


@pytest.mark.parametrize("hflip", [False, True])
def test_hflip_flips_every_training_batch_and_only_then(store, image_csv, tmp_path, monkeypatch,
                                                        hflip):
    monkeypatch.chdir(tmp_path)
    flipped = []
    monkeypatch.setattr(train_tokenizer, "random_hflip",
                        lambda images, generator: flipped.append(len(images)) or images.flip(-1))
    run_main(train_vqvae.main, ["--path_to_data", str(image_csv), *TINY_VQVAE,
                                "--max_steps", "3", "--eval_every", "3",
                                *(["--hflip"] if hflip else [])])
    assert flipped == ([16] * 3 if hflip else [])
