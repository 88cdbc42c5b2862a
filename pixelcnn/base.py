"""What the four convolutional priors share: a pixel grid in, head outputs per pixel out.

A position is a pixel: for RGB `levels` tokens (r g b r g b ... along a row) the three values of
a pixel enter the network together, and the output at a pixel, which reads only earlier pixels,
parameterises all three (the mixture head couples them linearly, PixelCNN++'s way). So no
channel masking is needed, and the softmax head, which would need it, is refused for RGB.

A family implements `network(grid (B, rows, W, C), label (a Label for those rows,
pixelcnn/layers.py) or None, top) -> (B, out_dim, rows, W)` for rows top .. top + rows - 1 of
the grid, and sets `rows_above`: how many rows above a pixel its output can read (None: all
of them). Sampling a pixel in row i then runs the network on rows max(0, i - rows_above) .. i
only: rows below i are never read (causality), and rows further up are outside the receptive
field, so the crop is exact (a test checks it against the full forward).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from core.config import field
from pixelcnn.layers import Label
from priors.base import PriorConfig, RasterPrior


@dataclass
class ConvConfig(PriorConfig):
    head: str = field("auto", "softmax | mixture | auto: mixture for ordered tokens (pixel "
                              "levels), softmax for VQ codes and palette entries")
    embed_dim: int = field(32, "channels of a pixel's input: its tokens' embeddings, summed")
    label_maps: int = field(8, "with --conditional: channels of a learned map per class over "
                               "the pixel grid, projected into every layer beside the label's "
                               "per-channel bias, so the class can say where ink goes (0: the "
                               "bias alone, as priors trained before this field)")
    # what a checkpoint's config that lacks a field meant (core.config.from_record)
    before: ClassVar[dict] = {"label_maps": 0}

    def __post_init__(self):
        if self.head == "auto":
            self.head = "mixture" if self.ordered else "softmax"


class ConvPrior(RasterPrior):
    whole_pixels = True
    rows_above = None  # rows above a pixel that its output reads; None: every row

    def __init__(self, config, label_dim):
        super().__init__(config)
        self.height, self.width = config.grid_h, config.grid_w // config.channels
        # one table for the values of every channel: a pixel's input is the sum of its
        # channels' vectors (a linear layer on the concatenated one-hots)
        self.embedding = nn.Embedding(config.channels * config.vocab_size, config.embed_dim)
        self.register_buffer("channel_offset", torch.arange(config.channels) * config.vocab_size,
                             persistent=False)
        self.label_embedding = self.make_label_embedding(label_dim)
        # (num_classes + 1, label_maps * H * W); none in a checkpoint from before the maps,
        # whose config reads label_maps 0 (ConvConfig.before)
        maps = config.label_maps * self.height * self.width
        self.label_map = self.make_label_embedding(maps) if maps else None

    def embed(self, grid):
        """(B, rows, W, C) token values -> (B, embed_dim, rows, W)."""
        return self.embedding(grid + self.channel_offset).sum(3).permute(0, 3, 1, 2)

    @property
    def label_maps(self):
        """Channels of the label maps each layer's LabelBias reads (0: none)."""
        return self.config.label_maps if self.label_map is not None else 0

    def label_of(self, labels):
        """(B,) class ids -> a Label over the whole grid, or None."""
        if labels is None:
            return None
        maps = (self.label_map(labels).view(-1, self.config.label_maps, self.height, self.width)
                if self.label_map is not None else None)
        return Label(self.label_embedding(labels), maps)

    def network(self, grid, label, top=0):
        raise NotImplementedError

    def forward(self, tokens, labels=None):
        """tokens (N, h, w) -> head outputs (N, P, out_dim) for the P pixels in raster order,
        each from earlier pixels only, and the mean nll in nats per token."""
        n = tokens.shape[0]
        grid = tokens.reshape(n, self.height, self.width, self.config.channels)
        label = self.label_of(self.training_labels(labels, n, tokens.device))
        out = self.network(grid, label).flatten(2).transpose(1, 2)  # (N, P, out_dim)
        nll = self.head.nll(out, grid.flatten(1, 2))  # (N, P) nats per pixel
        return out, nll.mean() / self.config.channels

    # the raster sampler's hooks (priors/sampling.py)

    def begin(self, batch, labels):
        return {"label": self.label_of(labels)}

    def rows_for(self, row):
        """The first row of the exact crop for outputs in `row`."""
        return 0 if self.rows_above is None else max(0, row - self.rows_above)

    def step(self, state, p, tokens):
        """Head output (B, out_dim) at pixel p, from the rows its receptive field covers."""
        row, col = divmod(p, self.width)
        top = self.rows_for(row)
        grid = tokens.view(tokens.shape[0], self.height, self.width, -1)[:, top:row + 1]
        label = state["label"].rows(top, row + 1 - top) if state["label"] is not None else None
        return self.network(grid, label, top)[:, :, -1, col]
