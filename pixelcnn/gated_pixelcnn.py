"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders"): a vertical and a horizontal stack without the blind spot, gated activations, and a
class-conditional bias in every gated layer.

The vertical stack reads whole rows: its feature at (i, j) covers rows <= i (a (k//2 + 1) x k
kernel that pads only above), columns within reach on both sides. The horizontal stack reads
the current row left of the pixel (a 1 x (k//2 + 1) kernel that pads only on the left; the
first layer shifts right by one so it never reads the pixel itself). Each layer feeds the
vertical features into the horizontal stack shifted down by one row, so the horizontal stack
sees every pixel above, up-right included, and nothing at or after the pixel. Both stacks use
tanh(a) * sigmoid(b) gates, to whose pre-activations each layer adds its own projection of
the label (the paper's V^T h, and its V * s: a bias per position from the label maps,
pixelcnn/layers.py LabelBias).
"""

from dataclasses import dataclass

import torch.nn as nn

from core.config import field
from core.errors import UserError
from pixelcnn.base import ConvConfig, ConvPrior
from pixelcnn.layers import (DownRightShiftedConv2d, DownShiftedConv2d, LabelBias, down_shift,
                             gate, right_shift)
from priors.dropout import Dropout


@dataclass
class GatedPixelCNNConfig(ConvConfig):
    filters: int = field(32, "channels of each stack")
    n_layers: int = field(8, "gated layers (each a vertical and a horizontal convolution)")
    kernel: int = field(3, "k: the vertical kernel is (k//2 + 1) x k, the horizontal 1 x (k//2 + 1)")
    output_filters: int = field(128, "channels of the two 1x1 output layers")
    dropout: float = field(0.0, "dropout on each gated horizontal output")

    def validate(self):
        super().validate()
        if self.kernel < 3 or self.kernel % 2 == 0:
            raise UserError(f"--kernel must be odd and at least 3, got {self.kernel}")


class GatedLayer(nn.Module):
    """One layer of both stacks: (v, h) -> (v', h'); see the module docstring."""

    def __init__(self, in_channels, filters, kernel, first, label_dim, label_maps, dropout):
        super().__init__()
        reach = kernel // 2
        self.first = first
        self.vertical = DownShiftedConv2d(in_channels, 2 * filters, (reach + 1, kernel))
        self.vertical_to_horizontal = nn.Conv2d(2 * filters, 2 * filters, 1)
        # the first layer reads the input pixels: `reach` taps ending at j, shifted to end at j-1
        self.horizontal = DownRightShiftedConv2d(in_channels, 2 * filters,
                                                 (1, reach if first else reach + 1))
        self.dropout = Dropout(dropout)
        self.horizontal_out = nn.Conv2d(filters, filters, 1)
        self.label = LabelBias(label_dim, label_maps, 4 * filters) if label_dim else None

    def forward(self, v, h, label=None):
        """v, h (B, in_channels, H, W); label (a Label) or None -> v', h' (B, F, H, W)."""
        v_pre = self.vertical(v)  # (B, 2F, H, W), rows <= i
        h_pre = self.horizontal(h)
        if self.first:
            h_pre = right_shift(h_pre)
        h_pre = h_pre + self.vertical_to_horizontal(down_shift(v_pre))  # rows < i only
        if label is not None:
            label_v, label_h = self.label(label, v_pre).chunk(2, 1)
            v_pre, h_pre = v_pre + label_v, h_pre + label_h
        h_out = self.horizontal_out(self.dropout(gate(h_pre)))
        # no residual in the first layer: its input at (i, j) is the pixel itself
        return gate(v_pre), (h_out if self.first else h + h_out)


class GatedPixelCNN(ConvPrior):
    family = "gated_pixelcnn"

    def __init__(self, config):
        super().__init__(config, label_dim=config.filters)
        label_dim = config.filters if config.num_classes else 0
        self.layers = nn.ModuleList(
            GatedLayer(config.embed_dim if i == 0 else config.filters, config.filters,
                       config.kernel, i == 0, label_dim, self.label_maps, config.dropout)
            for i in range(config.n_layers))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(config.filters, config.output_filters, 1),
                                 nn.ReLU(), nn.Conv2d(config.output_filters, self.head.out_dim, 1))
        # layer l's vertical features reach l * (k//2) rows up, then the shift adds one
        self.rows_above = 1 + config.n_layers * (config.kernel // 2)

    def network(self, grid, label, top=0):
        v = h = self.embed(grid)
        for layer in self.layers:
            v, h = layer(v, h, label=label)
        return self.out(h)


# the registry's names (priors/__init__.py)
Config, Model = GatedPixelCNNConfig, GatedPixelCNN
TRAIN_DEFAULTS = {"batch_size": 16, "max_steps": 1000, "learning_rate": 2e-3,
                  "weight_decay": 0.0, "eval_every": 250}
