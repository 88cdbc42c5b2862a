"""PixelSNAIL (Chen et al. 2018): causal convolutions interleaved with causal self-attention.

A stream whose feature at a pixel reads only the pixels before it (PixelCNN++'s `ul` start,
then gated resnet blocks of down-right-shifted 2x2 convolutions) passes through `n_blocks`
blocks of [n_resnet gated resnets -> attention over every earlier pixel -> a 1x1 gated resnet
mixing the attention's output in]. Convolutions give the local detail, attention an unbounded
receptive field. Queries come from the stream and the pixel's position (coordinates and a
learned vector); keys and values also from the input pixels themselves, so a pixel attends
strictly to earlier pixels, never to itself (pixelcnn/layers.py CausalAttention). With a
label, every gated resnet block adds its own projection of it before the gate (a bias per
channel, and one per position from the label maps: pixelcnn/layers.py LabelBias).

`up_stream` (default on) adds PixelCNN++'s stream of the rows above (2x3 convolutions) and
feeds it into each 2x2 block, as PixelCNN++'s up pass does: the published models ran the
2x2 stream alone with a dozen attention blocks. At two blocks, on the digits, 0.864
validation bits/dim without it (48 filters) became 0.791 with it (32 filters), in about the
same training time.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import field
from core.errors import UserError
from pixelcnn.base import ConvConfig, ConvPrior
from pixelcnn.layers import (CausalAttention, DownRightShiftedConv2d, DownShiftedConv2d,
                             GatedResnet, down_shift, right_shift)


@dataclass
class PixelSNAILConfig(ConvConfig):
    filters: int = field(32, "channels of each stream")
    n_blocks: int = field(2, "blocks, each ending in one causal attention layer")
    n_resnet: int = field(1, "gated resnet blocks (2x2 causal convolutions) per block")
    n_head: int = field(1, "heads of each attention layer")
    key_dim: int = field(16, "query and key channels of each attention layer, all heads")
    value_dim: int = field(48, "value channels of each attention layer, all heads")
    position_dim: int = field(16, "channels of a learned embedding of each pixel's position, "
                                  "given to queries and keys (0: its row and column only)")
    dropout: float = field(0.1, "dropout inside each gated resnet block")
    up_stream: bool = field(True, "also run PixelCNN++'s stream of the rows above (2x3 "
                                  "convolutions) beside the 2x2 one, feeding it each block")

    def validate(self):
        super().validate()
        if self.n_blocks < 1 or self.n_resnet < 0:
            raise UserError("--n_blocks must be at least 1 and --n_resnet at least 0")
        if self.key_dim % self.n_head or self.value_dim % self.n_head:
            raise UserError(f"--key_dim and --value_dim must be multiples of --n_head "
                            f"{self.n_head}")


def pointwise(in_channels, out_channels):
    return nn.Conv2d(in_channels, out_channels, 1)


class PixelSNAIL(ConvPrior):
    family = "pixelsnail"

    def __init__(self, config):
        super().__init__(config, label_dim=config.filters)
        f = config.filters
        label_dim = f if config.num_classes else 0
        block = partial(GatedResnet, f, label_dim=label_dim, label_maps=self.label_maps,
                        dropout=config.dropout)
        # the stream's first features: the row above (1 x 3) and the pixel left (2 x 1), shifted
        e = config.embed_dim
        self.start_above = DownShiftedConv2d(e, f, (1, 3))
        self.start_left = DownRightShiftedConv2d(e, f, (2, 1))
        count = config.n_blocks * config.n_resnet
        up = config.up_stream
        self.u_start = DownShiftedConv2d(e, f, (2, 3)) if up else None
        self.u_resnets = nn.ModuleList(block(DownShiftedConv2d) for _ in range(count if up else 0))
        self.resnets = nn.ModuleList(block(DownRightShiftedConv2d, skip_channels=f if up else 0)
                                     for _ in range(count))
        # the background queries and keys see: each pixel's row and column, and a learned vector
        # per position (coordinates alone let a query prefer an area, not "the pixel above")
        self.position = nn.Parameter(0.02 * torch.randn(config.position_dim, self.height,
                                                        self.width))
        where = 2 + config.position_dim
        self.attention = nn.ModuleList(
            CausalAttention(f + where, e + f + where, config.key_dim, config.value_dim,
                            config.n_head)
            for _ in range(config.n_blocks))
        self.mix = nn.ModuleList(block(pointwise, skip_channels=config.value_dim)
                                 for _ in range(config.n_blocks))
        self.out = nn.Conv2d(f, self.head.out_dim, 1)

    def background(self, batch, rows, top, device):
        """(batch, 2 + position_dim, rows, W) for rows top..: each pixel's row and column in
        [-0.5, 0.5), and its learned position vector."""
        row = (torch.arange(top, top + rows, device=device) / self.height - 0.5)
        col = (torch.arange(self.width, device=device) / self.width - 0.5)
        grid = torch.stack(torch.meshgrid(row, col, indexing="ij"))  # (2, rows, W)
        grid = torch.cat([grid, self.position[:, top:top + rows]])
        return grid.expand(batch, -1, -1, -1)

    def network(self, grid, label, top=0):
        x = self.embed(grid)  # (B, E, rows, W)
        background = self.background(x.shape[0], x.shape[2], top, x.device)
        ul = down_shift(self.start_above(x)) + right_shift(self.start_left(x))
        u = down_shift(self.u_start(x)) if self.u_start is not None else None
        n_resnet = self.config.n_resnet
        for b, (attention, mix) in enumerate(zip(self.attention, self.mix)):
            for k in range(b * n_resnet, (b + 1) * n_resnet):
                if u is not None:
                    u = self.u_resnets[k](u, label=label)
                ul = self.resnets[k](ul, u, label=label)
            attended = attention(torch.cat([ul, background], 1),
                                 torch.cat([x, ul, background], 1))
            ul = mix(ul, attended, label=label)
        return self.out(F.elu(ul))


# the registry's names (priors/__init__.py)
Config, Model = PixelSNAILConfig, PixelSNAIL
TRAIN_DEFAULTS = {"batch_size": 16, "max_steps": 700, "learning_rate": 2e-3,
                  "weight_decay": 0.0, "eval_every": 175}
