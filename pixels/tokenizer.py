"""The pixel tokenizer (kind `pixels`): an image's own pixels as tokens, with no learned encoder.

- `levels`: each channel's value cut into 2^bits evenly spaced levels, 0 and 1 included
  (level l decodes to l / (2^bits - 1)). Levels are ordered, so a logistic-mixture head can
  model them. Grey images give an (S, S) grid; RGB images the interleaved byte stream
  r1 g1 b1 r2 g2 b2 ... as an (S, 3S) grid (values_per_pixel = 3).
- `palette`: each pixel becomes the nearest of k colours, k-means centres of training pixels
  (Image GPT's colour clusters); an (S, S) grid of unordered tokens.

encode((N, C, S, S) floats in [0, 1]) -> (N, h, w) LongTensor; decode(tokens) -> images.
Decoding is exact: encode(decode(tokens)) == tokens. A fitted kind (image_tokenizers/base.py):
`PixelTokenizer.fit` fits the palette on training pixels; levels need nothing fitted.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from core.config import field
from core.errors import UserError
from image_tokenizers.base import Tokenizer

MAX_FIT_PIXELS = 200_000  # training pixels the palette's k-means sees (a seeded sample)


@dataclass
class PixelsConfig:
    mode: str = field("levels", "levels (2^bits values per channel; RGB: the r g b byte "
                                "stream) or palette (k-means colours of the training pixels)")
    bits: int = field(4, "levels: bits per channel value")
    palette_size: int = field(16, "palette: k colours")
    image_size: Optional[int] = field(None, "images are resized and center-cropped to this "
                                            "square (unset: the first image's shorter side)")
    in_channels: int = field(1, "1 (grey) or 3 (RGB)")

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
        if self.image_size is None or self.image_size < 1 or self.in_channels not in (1, 3):
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


class PixelTokenizer(Tokenizer):
    kind = "pixels"
    fitted = True    # a palette is fitted on training pixels; levels need nothing
    lossless = True  # a level decodes to its own value, a palette entry to its own colour

    def __init__(self, config, palette=None):
        super().__init__(config)
        if config.mode == "palette" and palette is None:
            palette = torch.zeros(config.palette_size, config.in_channels)
        # (k, C) colours in [0, 1]; a buffer, so it travels in the checkpoint's weights
        self.register_buffer("palette", palette if config.mode == "palette" else None)

    @classmethod
    def fit(cls, config, images, seed=0):
        """(N, C, S, S) training images in [0, 1] -> the tokenizer (palette: k-means on at most
        MAX_FIT_PIXELS of their pixels, a seeded sample)."""
        if config.mode != "palette":
            return cls(config)
        pixels = images.float().permute(0, 2, 3, 1).reshape(-1, config.in_channels)
        pick = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))
        return cls(config, kmeans_palette(pixels[pick[:MAX_FIT_PIXELS]], config.palette_size,
                                          seed=seed))

    @property
    def vocab_size(self):
        return self.config.vocab_size

    @property
    def grid(self):
        return self.config.grid

    @property
    def values_per_pixel(self):
        return self.config.values_per_pixel

    @property
    def ordered(self):
        return self.config.mode == "levels"

    def run_name(self):
        config = self.config
        detail = f"{config.bits}bit" if config.mode == "levels" else f"K{config.palette_size}"
        return f"pixels {config.mode} {detail} {config.image_size}px"

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


# the registry's names (image_tokenizers/__init__.py)
Config, Model = PixelsConfig, PixelTokenizer
