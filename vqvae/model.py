"""The VQ-VAE tokenizer (kind `vqvae`): a convolutional encoder and decoder with residual blocks
around a quantizer, trained by gradient steps (pipeline/train_tokenizer.py).

The tokenizer's two verbs (image_tokenizers/base.py):
    encode(images)  (B, C, S, S) floats in [0, 1] -> (B, h, w) LongTensor of code indices
    decode(indices) (B, h, w)                    -> (B, C, S, S) floats in [0, 1]
with h = w = image_size / downsample; `forward` is the training objective.

Two layouts of encoder and decoder (`block`), both around the same quantizer:
    vqvae  the original VQ-VAE's (van den Oord et al. 2017): strided convs down to the code grid,
           ReLU residual blocks there only, transposed convs back up
    vqgan  taming-transformers' VQGAN (Esser et al. 2021), as Unleashing Transformers uses it:
           GroupNorm + swish ResNet blocks at every resolution, a middle block at the code grid,
           nearest-neighbour upsampling
`channel_mult` widens the layers level by level and `attn_resolutions` adds single-head
self-attention (non-local) blocks after the residual blocks at those feature-map sizes, in
either layout. The defaults build exactly the model of the checkpoints written before these
options (same state-dict keys, same outputs).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import field
from core.errors import UserError
from image_tokenizers.base import Tokenizer
from vqvae.quantizer import VectorQuantizer


BLOCKS = ("vqvae", "vqgan")


def int_list(text, flag):
    """'1,2,2' -> [1, 2, 2]; '' -> []."""
    try:
        return [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma list of integers, got '{text}'") from None


@dataclass
class VQVAEConfig:
    in_channels: int = field(3, "1 for grayscale, 3 for RGB")
    image_size: int = field(32, "images are resized and center-cropped to this square")
    channels: int = field(64, "width of the conv layers (x --channel_mult at each resolution)")
    downsample: int = field(4, "2, 4, 8 or 16: the code grid is image_size / downsample")
    n_res_blocks: int = field(2, "residual blocks in each of encoder and decoder: at the code "
                                 "resolution (--block vqvae), at every resolution (vqgan)")
    codebook_size: int = field(512, "K, the number of codes")
    code_dim: int = field(64, "D, the dimension of one code vector")
    commitment: float = field(0.25, "beta of the commitment loss")
    codebook_decay: float = field(0.99, "the codebook's EMA update rate (the VQ-VAE's "
                                        "--ema_decay before; that now averages the weights)")
    dead_code_threshold: float = field(1.0, "restart a code whose EMA count drops below this")
    block: str = field("vqvae", "vqvae: strided convs, ReLU residual blocks at the code grid "
                                "only; vqgan: GroupNorm + swish ResNet blocks at every "
                                "resolution and a middle block (taming's VQGAN)")
    channel_mult: str = field("", "e.g. 1,2,2: --channels x these at each resolution, the "
                                  "image's first (log2(downsample) + 1 entries; default all 1)")
    attn_resolutions: str = field("", "e.g. 4: feature-map sizes at which single-head "
                                      "self-attention follows each residual block (vqvae: the "
                                      "code grid's only; default none)")

    # keys of configs recorded before a rename -> their names now (core.config.build reads them)
    renamed: ClassVar[dict] = {"ema_decay": "codebook_decay"}

    @property
    def grid_size(self):
        return self.image_size // self.downsample

    @property
    def levels(self):
        """Halvings between the image and the code grid."""
        return int(math.log2(self.downsample))

    @property
    def widths(self):
        """Channels at each resolution, the image's first: levels + 1 of them."""
        mult = int_list(self.channel_mult, "--channel_mult") or [1] * (self.levels + 1)
        return [self.channels * m for m in mult]

    @property
    def attention_sizes(self):
        return set(int_list(self.attn_resolutions, "--attn_resolutions"))

    def validate(self):
        if self.downsample not in (2, 4, 8, 16):
            raise UserError(f"--downsample must be 2, 4, 8 or 16, got {self.downsample}")
        if self.image_size % self.downsample:
            raise UserError(f"--image_size {self.image_size} is not divisible by "
                            f"--downsample {self.downsample}")
        if self.in_channels not in (1, 3):
            raise UserError(f"--in_channels must be 1 or 3, got {self.in_channels}")
        if self.codebook_size < 2:
            raise UserError(f"--codebook_size must be at least 2, got {self.codebook_size}")
        if self.block not in BLOCKS:
            raise UserError(f"--block must be one of {', '.join(BLOCKS)}, got '{self.block}'")
        mult = int_list(self.channel_mult, "--channel_mult")
        if mult and (len(mult) != self.levels + 1 or min(mult) < 1):
            raise UserError(f"--channel_mult needs {self.levels + 1} positive entries (one per "
                            f"resolution, {self.image_size} px down to the {self.grid_size} x "
                            f"{self.grid_size} grid), got '{self.channel_mult}'")
        sizes = [self.image_size >> level for level in range(self.levels + 1)]
        allowed = sizes if self.block == "vqgan" else [self.grid_size]  # where blocks are
        wrong = sorted(self.attention_sizes - set(allowed))
        if wrong:
            raise UserError(f"--attn_resolutions {self.attn_resolutions}: {wrong[0]} is not a "
                            f"resolution with residual blocks in --block {self.block} (one of "
                            f"{', '.join(map(str, allowed))})")


# blocks

def group_norm(channels):
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the block of the original VQ-VAE."""

    def __init__(self, channels):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class ResnetBlock(nn.Module):
    """VQGAN's block: skip(x) + conv3x3(swish(norm(conv3x3(swish(norm(x)))))), the skip a 1x1
    conv where the width changes."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3,
                                                                    padding=1)
        self.norm2, self.conv2 = group_norm(out_channels), nn.Conv2d(out_channels, out_channels,
                                                                     3, padding=1)
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttentionBlock(nn.Module):
    """Single-head self-attention across the h*w positions (VQGAN's non-local block):
    x + proj(softmax(q k^T / sqrt(C)) v), q, k, v 1x1 convs of norm(x)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(1)  # each (B, 1 head, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


# the two layouts: lists of layers, encoder (B, C, S, S) -> (B, D, h, w), decoder back

def vqvae_encoder(config):
    widths, attend = config.widths, config.grid_size in config.attention_sizes
    layers = [nn.Conv2d(config.in_channels, widths[0], 3, padding=1)]
    for level in range(config.levels):  # each halves h and w
        layers += [nn.ReLU(), nn.Conv2d(widths[level], widths[level + 1], 4, stride=2,
                                        padding=1)]
    for _ in range(config.n_res_blocks):
        layers += [ResBlock(widths[-1])] + ([AttentionBlock(widths[-1])] if attend else [])
    return layers + [nn.ReLU(), nn.Conv2d(widths[-1], config.code_dim, 1)]


def vqvae_decoder(config):
    widths, attend = config.widths, config.grid_size in config.attention_sizes
    layers = [nn.Conv2d(config.code_dim, widths[-1], 3, padding=1)]
    for _ in range(config.n_res_blocks):
        layers += [ResBlock(widths[-1])] + ([AttentionBlock(widths[-1])] if attend else [])
    for level in reversed(range(config.levels)):  # each doubles h and w
        layers += [nn.ReLU(), nn.ConvTranspose2d(widths[level + 1], widths[level], 4, stride=2,
                                                 padding=1)]
    return layers + [nn.ReLU(), nn.Conv2d(widths[0], config.in_channels, 3, padding=1)]


def vqgan_level(config, level, in_channels, blocks):
    """`blocks` ResNet blocks at one resolution level, each followed by attention there if asked."""
    width = config.widths[level]
    attend = config.image_size >> level in config.attention_sizes
    layers = []
    for i in range(blocks):
        layers += [ResnetBlock(in_channels if i == 0 else width, width)]
        layers += [AttentionBlock(width)] if attend else []
    return layers


def vqgan_middle(config):
    width = config.widths[-1]
    attend = config.grid_size in config.attention_sizes
    return ([ResnetBlock(width, width)] + ([AttentionBlock(width)] if attend else [])
            + [ResnetBlock(width, width)])


def vqgan_encoder(config):
    widths = config.widths
    layers = [nn.Conv2d(config.in_channels, widths[0], 3, padding=1)]
    for level in range(config.levels + 1):
        layers += vqgan_level(config, level, widths[max(level - 1, 0)], config.n_res_blocks)
        if level < config.levels:  # halve h and w
            layers += [nn.Conv2d(widths[level], widths[level], 3, stride=2, padding=1)]
    layers += vqgan_middle(config)
    return layers + [group_norm(widths[-1]), nn.SiLU(),
                     nn.Conv2d(widths[-1], config.code_dim, 1)]


def vqgan_decoder(config):
    widths = config.widths
    layers = [nn.Conv2d(config.code_dim, widths[-1], 3, padding=1)] + vqgan_middle(config)
    for level in reversed(range(config.levels + 1)):
        layers += vqgan_level(config, level, widths[min(level + 1, config.levels)],
                              config.n_res_blocks)
        if level > 0:  # double h and w
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(widths[level], widths[level], 3, padding=1)]
    return layers + [group_norm(widths[0]), nn.SiLU(),
                     nn.Conv2d(widths[0], config.in_channels, 3, padding=1)]


LAYOUTS = {"vqvae": (vqvae_encoder, vqvae_decoder), "vqgan": (vqgan_encoder, vqgan_decoder)}


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.net = nn.Sequential(*LAYOUTS[config.block][0](config))

    def forward(self, x):  # (B, C, S, S) -> (B, D, h, w)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.net = nn.Sequential(*LAYOUTS[config.block][1](config))

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
                                         config.codebook_decay, config.dead_code_threshold)
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
        name = f"vqvae f{config.downsample} K{config.codebook_size} {config.image_size}px"
        return name if config.block == "vqvae" else f"{name} {config.block}"

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
