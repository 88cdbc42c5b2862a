"""The adversarial option of the VQ-VAE (`--adversarial_weight`): a patch discriminator, the hinge
loss, and the adaptive weight of VQGAN (Esser et al. 2021).

- PatchGAN (Isola et al. 2017): a small conv net that returns a grid of real/fake logits, one per
  overlapping patch, so it judges local texture and sharpness, which a pixel MSE averages away.
- Hinge loss for the discriminator, -D(reconstruction) for the decoder (as VQGAN).
- Adaptive weight: lambda = |grad L_rec| / (|grad L_gen| + 1e-4), gradients taken at the
  decoder's last layer and lambda clamped to [0, 1e4], then times `adversarial_weight`. The
  adversarial gradient then has a fixed size relative to the reconstruction gradient however
  large the raw losses are.

VQGAN also adds a perceptual (LPIPS) loss on VGG features; pretrained networks cannot be
downloaded here, so there is none (see docs/tokenizers.md for what was measured without it).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3       # as the VQ-VAE's images
    channels: int = 64         # width of the first conv; doubled at each further stride-2 conv
    n_layers: int = 2          # stride-2 convs; each doubles the patch a logit sees

    def validate(self, image_size):
        from core.errors import UserError
        if self.n_layers < 1 or self.channels < 1:
            raise UserError(f"--discriminator_layers and --discriminator_channels must be at "
                            f"least 1, got {self.n_layers} and {self.channels}")
        if image_size // 2 ** self.n_layers < 3:  # two 4x4 stride-1 convs follow (-1 px each)
            raise UserError(f"--discriminator_layers {self.n_layers} is too many for "
                            f"{image_size}x{image_size} images (at most "
                            f"{max(1, (image_size // 3).bit_length() - 1)})")


class PatchDiscriminator(nn.Module):
    """(B, C, S, S) in [-1, 1] -> (B, 1, S / 2^n - 2, S / 2^n - 2) logits (real > 0 > fake).

    GroupNorm rather than pix2pix's BatchNorm: every image is judged on its own, so a batch split
    into micro-batches or across ranks gives the same logits."""

    def __init__(self, config):
        super().__init__()
        c = config.channels
        layers = [nn.Conv2d(config.in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, config.n_layers):
            c_in, c = c, config.channels * min(2 ** i, 8)
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1, bias=False),
                       nn.GroupNorm(1, c), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(c, c, 4, padding=1, bias=False), nn.GroupNorm(1, c),
                   nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 4, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def discriminator_loss(logits_real, logits_fake):
    """Hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_loss(logits_fake):
    return -logits_fake.mean()


def adaptive_weight(reconstruction_loss, adversarial_loss, last_layer, max_weight=1e4):
    """VQGAN's lambda: the ratio of the two losses' gradient norms at `last_layer` (a weight
    tensor both losses reach), clamped, detached."""
    (grad_reconstruction,) = torch.autograd.grad(reconstruction_loss, last_layer,
                                                 retain_graph=True)
    (grad_adversarial,) = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)
    weight = grad_reconstruction.norm() / (grad_adversarial.norm() + 1e-4)
    return weight.clamp(0, max_weight).detach()
