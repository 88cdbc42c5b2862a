"""PixelCNN (van den Oord et al. 2016, "Pixel Recurrent Neural Networks"): masked convolutions.

A 7x7 type-A masked convolution (the centre pixel hidden) reads the pixels before each pixel;
residual blocks of 1x1 -> 3x3 type-B masked -> 1x1 convolutions follow; two 1x1 layers map to
the head's outputs. A masked convolution never reads the pixels up and to the right beyond its
own kernel row, so stacking them leaves a blind spot (Gated PixelCNN removes it); kept here as
the paper had it. With a label, every residual block adds its own projection of the label
(a bias per channel, and one per position from the label maps: pixelcnn/layers.py LabelBias).
"""

from dataclasses import dataclass
from functools import partial

import torch.nn as nn
import torch.nn.functional as F

from core.config import field
from core.errors import UserError
from pixelcnn.base import ConvConfig, ConvPrior
from pixelcnn.layers import LabelBias, MaskedConv2d
from priors.dropout import Dropout


@dataclass
class PixelCNNConfig(ConvConfig):
    filters: int = field(64, "channels of the residual stream (2h in the paper's blocks)")
    n_layers: int = field(8, "residual blocks with a 3x3 type-B masked convolution")
    first_kernel: int = field(7, "kernel of the first, type-A masked convolution (odd)")
    output_filters: int = field(128, "channels of the two 1x1 output layers")
    dropout: float = field(0.0, "dropout inside each residual block")

    def validate(self):
        super().validate()
        if self.first_kernel % 2 == 0 or self.filters % 2:
            raise UserError("--first_kernel must be odd and --filters even")


class ResidualBlock(nn.Module):
    """x + 1x1(relu(masked3x3(relu(1x1(relu(x)))) + label)): the paper's block, halving the
    channels around the masked convolution."""

    def __init__(self, filters, label_dim, label_maps, dropout):
        super().__init__()
        half = filters // 2
        self.reduce = nn.Conv2d(filters, half, 1)
        self.conv = MaskedConv2d(half, half, 3, "B")
        self.label = LabelBias(label_dim, label_maps, half) if label_dim else None
        self.dropout = Dropout(dropout)
        self.expand = nn.Conv2d(half, filters, 1)

    def forward(self, x, label=None, conv=None):
        """`conv`, when given, stands in for the masked convolution (the cached sampler's)."""
        hidden = (conv or self.conv)(F.relu(self.reduce(F.relu(x))))
        if label is not None:
            hidden = hidden + self.label(label, hidden)
        return x + self.expand(self.dropout(F.relu(hidden)))


class PixelCNN(ConvPrior):
    family = "pixelcnn"

    def __init__(self, config):
        super().__init__(config, label_dim=config.filters)
        label_dim = config.filters if config.num_classes else 0
        self.first = MaskedConv2d(config.embed_dim, config.filters, config.first_kernel, "A")
        self.first_label = (LabelBias(label_dim, self.label_maps, config.filters)
                            if label_dim else None)
        self.blocks = nn.ModuleList(ResidualBlock(config.filters, label_dim, self.label_maps,
                                                  config.dropout)
                                    for _ in range(config.n_layers))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(config.filters, config.output_filters, 1),
                                 nn.ReLU(), nn.Conv2d(config.output_filters, self.head.out_dim, 1))
        # each masked conv reads its kernel's rows above: the first 3 (for 7x7), then 1 each
        self.rows_above = config.first_kernel // 2 + config.n_layers

    def network(self, grid, label, top=0):
        return self.layers_after_first(self.first(self.embed(grid)), label)

    def layers_after_first(self, x, label, convs=None):
        """Everything after the first convolution; convs[k], when given, runs block k's masked
        convolution."""
        if label is not None:
            x = x + self.first_label(label, x)
        for k, block in enumerate(self.blocks):
            x = block(x, label=label, conv=convs[k] if convs else None)
        return self.out(x)

    # sampling with cached layer inputs (the idea of Ramachandran et al. 2017's fast PixelCNN++):
    # a masked convolution's output at pixel p reads its input at p and before, and every
    # input at p is computed at step p, so one step computes each layer at p only. The rest of
    # every layer is 1x1 convolutions and pointwise, which run on (B, C, 1, 1) maps unchanged.

    def begin(self, batch, labels):
        convs = [self.first, *(block.conv for block in self.blocks)]
        return {"label": self.label_of(labels),
                "caches": [conv.new_cache(batch, self.height, self.width) for conv in convs]}

    def step(self, state, p, tokens):
        row, col = divmod(p, self.width)
        first_cache, *block_caches = state["caches"]
        if p > 0:  # the pixel drawn last is now an input of the first layer
            last = tokens[:, p - 1].view(tokens.shape[0], 1, 1, -1)
            self.first.store(first_cache, *divmod(p - 1, self.width), self.embed(last))
        x = self.first.at(first_cache, row, col)  # (B, F, 1, 1): type A, pixels before p
        convs = [partial(block.conv.at, cache, row, col)
                 for block, cache in zip(self.blocks, block_caches)]
        label = state["label"].at(row, col) if state["label"] is not None else None
        return self.layers_after_first(x, label, convs)[:, :, 0, 0]


# the registry's names (priors/__init__.py)
Config, Model = PixelCNNConfig, PixelCNN
TRAIN_DEFAULTS = {"batch_size": 16, "max_steps": 1500, "learning_rate": 2e-3,
                  "weight_decay": 0.0, "eval_every": 250}
