"""Quantizer and VQ-VAE invariants, on tiny random tensors."""

import torch
import torch.nn.functional as F

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from vqvae.model import VQVAE, VQVAEConfig
from image_tokenizers import from_checkpoint as tokenizer_from_checkpoint
from vqvae.quantizer import VectorQuantizer, kmeans

CONFIG = VQVAEConfig(in_channels=3, image_size=16, channels=16, downsample=4, n_res_blocks=1,
                     codebook_size=32, code_dim=8)


def trained_once(config=CONFIG):
    torch.manual_seed(0)
    model = VQVAE(config)
    model(torch.rand(8, config.in_channels, 16, 16))  # one training-mode pass: k-means init
    return model


def test_indices_in_range_and_shaped_like_the_grid():
    model = trained_once().eval()
    indices = model.encode(torch.rand(5, 3, 16, 16))
    assert indices.shape == (5, 4, 4) and indices.dtype == torch.long
    assert indices.min() >= 0 and indices.max() < CONFIG.codebook_size


def test_decode_of_encode_equals_forward_reconstruction():
    model = trained_once().eval()
    images = torch.rand(4, 3, 16, 16)
    recon, _, indices = model(images)
    assert torch.equal(indices, model.encode(images))
    torch.testing.assert_close(model.decode(indices), recon.clamp(0, 1))


def test_straight_through_gradient_reaches_the_encoder():
    model = trained_once()
    _, loss, _ = model(torch.rand(4, 3, 16, 16))
    loss.backward()
    first_conv = model.encoder.net[0].weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0


def test_commitment_loss_is_beta_times_distance_to_the_chosen_code():
    quantizer = VectorQuantizer(8, 4, commitment=0.25).eval()
    quantizer.initialized.fill_(True)
    z = torch.randn(2, 4, 3, 3)
    quantized, commitment, indices = quantizer(z)
    expected = 0.25 * F.mse_loss(z, quantizer.lookup(indices))
    torch.testing.assert_close(commitment, expected)
    torch.testing.assert_close(quantized, quantizer.lookup(indices))  # forward value = the code


def test_commitment_gradient_flows_to_the_encoder_output_only():
    quantizer = VectorQuantizer(8, 4).eval()
    quantizer.initialized.fill_(True)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, commitment, _ = quantizer(z)
    commitment.backward()
    assert z.grad.abs().sum() > 0
    assert not quantizer.codebook.requires_grad  # the codebook moves by EMA, not by gradient


def test_dead_codes_are_restarted_on_encoder_outputs():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 2, dead_code_threshold=1.0)
    data = torch.randn(1, 2, 16, 16)
    quantizer(data)  # k-means init on this batch
    quantizer.codebook[:8] = 1e3  # make half the codebook unreachable
    quantizer.ema_count[:8] = 0.5
    quantizer(data)
    assert (quantizer.codebook[:8].abs() < 100).all()  # replaced by real encoder outputs
    quantizer.eval()
    used = quantizer.indices(data).unique().numel()
    assert used > 8


def test_kmeans_finds_well_separated_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centers])
    found, counts = kmeans(points, 3)
    distances = torch.cdist(centers, found).min(1).values
    assert (distances < 0.5).all() and counts.sum() == 150


def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path):
    model = trained_once().eval()
    path = tmp_path / "model.pt"
    save_checkpoint({"kind": "vqvae", "config": vars(CONFIG).copy(), "model": model.state_dict(),
                     "step": 1}, path)
    loaded = tokenizer_from_checkpoint(load_checkpoint(path, "vqvae"))
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(model.encode(images), loaded.encode(images))
    torch.testing.assert_close(model(images)[0], loaded(images)[0])
    assert not list(tmp_path.glob("*.tmp"))
