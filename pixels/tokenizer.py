"""Pixel tokenizers: an image's own pixels as tokens, with no learned encoder.

- `levels`: each channel's value cut into 2^bits evenly spaced levels, 0 and 1 included
  (level l decodes to l / (2^bits - 1)). Levels are ordered, so a logistic-mixture head can
  model them. Grey images give an (S, S) grid; RGB images the interleaved byte stream
  r1 g1 b1 r2 g2 b2 ... as an (S, 3S) grid (values_per_pixel = 3).
- `palette`: each pixel becomes the nearest of k colours, k-means centres of training pixels
  (Image GPT's colour clusters); an (S, S) grid of unordered tokens.

encode((N, C, S, S) floats in [0, 1]) -> (N, h, w) LongTensor; decode(tokens) -> images.
Decoding is exact: encode(decode(tokens)) == tokens.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from core.errors import UserError


@dataclass
class PixelsConfig:
    mode: str = "levels"       # levels | palette
    bits: int = 4              # levels: 2^bits values per channel
    palette_size: int = 16     # palette: k colours
    image_size: int = 16       # images are resized and center-cropped to this square
    in_channels: int = 1       # 1 grey, 3 RGB

    @property
    def vocab_size(self):
        return 2 ** self.bits if self.mode == "levels" else self.palette_size

    @property
    def values_per_pixel(self):
        return self.in_channels if self.mode == "levels" else 1

    @property
    def grid(self):
        return (self.image_size, self.image_size * self.values_per_pixel)

    def validate(self):
        if self.mode not in ("levels", "palette"):
            raise UserError(f"--pixels must be levels or palette, got '{self.mode}'")
        if self.mode == "levels" and not 1 <= self.bits <= 8:
            raise UserError(f"--bits must be in 1..8, got {self.bits}")
        if self.mode == "palette" and not 2 <= self.palette_size <= 4096:
            raise UserError(f"--palette_size must be in 2..4096, got {self.palette_size}")
        if self.image_size < 1 or self.in_channels not in (1, 3):
            raise UserError(f"--image_size must be positive and --in_channels 1 or 3, got "
                            f"{self.image_size} and {self.in_channels}")


def kmeans_palette(pixels, k, iters=20, seed=0):
    """(N, C) pixel colours in [0, 1] -> (k, C) centres by Lloyd's k-means (k-means++ start:
    a palette must not waste entries on duplicates of the background)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = pixels.float()
    centres = pixels[torch.randint(len(pixels), (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: next centre far from the chosen ones
        distance = torch.cdist(pixels, centres).min(1).values ** 2
        if distance.sum() <= 0:
            pick = torch.randint(len(pixels), (1,), generator=generator)
        else:
            pick = torch.multinomial(distance / distance.sum(), 1, generator=generator)
        centres = torch.cat([centres, pixels[pick]])
    for _ in range(iters):
        assign = torch.cdist(pixels, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, pixels)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


class PixelTokenizer(nn.Module):

    def __init__(self, config, palette=None):
        super().__init__()
        config.validate()
        self.config = config
        if config.mode == "palette" and palette is None:
            palette = torch.zeros(config.palette_size, config.in_channels)
        # (k, C) colours in [0, 1]; a buffer, so it travels in the checkpoint's weights
        self.register_buffer("palette", palette if config.mode == "palette" else None)

    def encode(self, images):
        """(N, C, S, S) floats in [0, 1] -> (N, h, w) LongTensor."""
        config = self.config
        if config.mode == "levels":
            top = 2 ** config.bits - 1
            levels = (images.clamp(0, 1) * top).round().long()  # (N, C, S, S)
            n, c, s, _ = levels.shape
            return levels.permute(0, 2, 3, 1).reshape(n, s, s * c)  # interleave the channels
        n, c, s, _ = images.shape
        flat = images.permute(0, 2, 3, 1).reshape(-1, c).float()
        return torch.cdist(flat, self.palette.float()).argmin(1).view(n, s, s)

    def decode(self, tokens):
        """(N, h, w) tokens -> (N, C, S, S) floats in [0, 1]."""
        config = self.config
        tokens = tokens.long()
        n, h, w = tokens.shape
        if config.mode == "levels":
            c = config.in_channels
            values = tokens.view(n, h, w // c, c).float() / (2 ** config.bits - 1)
            return values.permute(0, 3, 1, 2).contiguous()
        return self.palette[tokens].permute(0, 3, 1, 2).contiguous()

    def known_pixels(self, known):
        """(N, h, w) bool, True for known tokens -> (N, 1, S, S) bool: a pixel is known when
        all of its tokens are."""
        n, h, w = known.shape
        c = self.config.values_per_pixel
        return known.view(n, h, w // c, c).all(-1)[:, None]


def pixels_from_checkpoint(checkpoint):
    config = PixelsConfig(**checkpoint["config"])
    model = PixelTokenizer(config, checkpoint["model"].get("palette"))
    return model.eval()
