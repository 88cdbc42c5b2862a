"""The VQ-VAE tokenizer (kind `vqvae`): a convolutional encoder and decoder with residual blocks
around a quantizer, trained by gradient steps (pipeline/train_tokenizer.py).

The tokenizer's two verbs (image_tokenizers/base.py):
    encode(images)  (B, C, S, S) floats in [0, 1] -> (B, h, w) LongTensor of code indices
    decode(indices) (B, h, w)                    -> (B, C, S, S) floats in [0, 1]
with h = w = image_size / downsample; `forward` is the training objective.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError
from image_tokenizers.base import Tokenizer
from vqvae.quantizer import VectorQuantizer


@dataclass
class VQVAEConfig:
    in_channels: int = 3             # 1 for grayscale, 3 for RGB
    image_size: int = 32             # images are resized and center-cropped to this square
    channels: int = 64               # width of every conv layer
    downsample: int = 4              # 2, 4 or 8: the code grid is image_size / downsample
    n_res_blocks: int = 2            # residual blocks at the code resolution, in each of enc/dec
    codebook_size: int = 512         # K, the number of codes
    code_dim: int = 64               # D, the dimension of one code vector
    commitment: float = 0.25         # beta of the commitment loss
    ema_decay: float = 0.99          # codebook EMA decay
    dead_code_threshold: float = 1.0  # restart a code whose EMA count drops below this

    @property
    def grid_size(self):
        return self.image_size // self.downsample

    def validate(self):
        if self.downsample not in (2, 4, 8):
            raise UserError(f"--downsample must be 2, 4 or 8, got {self.downsample}")
        if self.image_size % self.downsample:
            raise UserError(f"--image_size {self.image_size} is not divisible by "
                            f"--downsample {self.downsample}")
        if self.in_channels not in (1, 3):
            raise UserError(f"--in_channels must be 1 or 3, got {self.in_channels}")
        if self.codebook_size < 2:
            raise UserError(f"--codebook_size must be at least 2, got {self.codebook_size}")


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the block of the original VQ-VAE."""

    def __init__(self, channels):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config.channels
        layers = [nn.Conv2d(config.in_channels, c, 3, padding=1)]
        for _ in range(int(math.log2(config.downsample))):  # each halves h and w
            layers += [nn.ReLU(), nn.Conv2d(c, c, 4, stride=2, padding=1)]
        layers += [ResBlock(c) for _ in range(config.n_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(c, config.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, C, S, S) -> (B, D, h, w)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config.channels
        layers = [nn.Conv2d(config.code_dim, c, 3, padding=1)]
        layers += [ResBlock(c) for _ in range(config.n_res_blocks)]
        for _ in range(int(math.log2(config.downsample))):  # each doubles h and w
            layers += [nn.ReLU(), nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(c, config.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # (B, D, h, w) -> (B, C, S, S)
        return self.net(z)

    @property
    def last_layer(self):
        """The output conv's weight, where the adversarial option compares gradient norms."""
        return self.net[-1].weight


class VQVAE(Tokenizer):
    kind = "vqvae"
    fitted = False  # trained by steps: pipeline/train_tokenizer.py

    def __init__(self, config):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.commitment,
                                         config.ema_decay, config.dead_code_threshold)
        self.decoder = Decoder(config)

    # Pixels are [0, 1] outside the model and [-1, 1] inside it.

    def forward(self, images):
        """images (B, C, S, S) in [0, 1] -> reconstruction (same shape, unclamped),
        loss (reconstruction MSE on the [-1, 1] scale + commitment), indices (B, h, w)."""
        x = images * 2 - 1
        quantized, commitment_loss, indices = self.quantizer(self.encoder(x))
        out = self.decoder(quantized)
        loss = F.mse_loss(out.float(), x.float()) + commitment_loss
        return (out + 1) / 2, loss, indices

    @property
    def vocab_size(self):
        return self.config.codebook_size

    @property
    def grid(self):
        return (self.config.grid_size,) * 2

    def run_name(self):
        config = self.config
        return f"vqvae f{config.downsample} K{config.codebook_size} {config.image_size}px"

    @torch.no_grad()
    def encode(self, images):
        """(B, C, S, S) in [0, 1] -> (B, h, w) LongTensor of code indices."""
        return self.quantizer.indices(self.encoder(images * 2 - 1))

    @torch.no_grad()
    def decode(self, indices):
        """(B, h, w) code indices -> (B, C, S, S) images clamped to [0, 1]."""
        out = self.decoder(self.quantizer.lookup(indices))
        return ((out + 1) / 2).clamp(0, 1)


# the registry's names (image_tokenizers/__init__.py)
Config, Model = VQVAEConfig, VQVAE
