"""PixelCNN++ (Salimans et al. 2017): down- and right-shifted convolutions in two streams, a
U-net of gated resnet blocks with skip connections from the up pass to the down pass, and the
discretized logistic mixture for ordered values (`--head mixture`, the default on pixel levels).

Two streams (pixelcnn/layers.py): `u` reads the rows above a pixel (down-shifted 2x3
convolutions), `ul` reads the pixels before it (down-right-shifted 2x2 convolutions, plus `u`
fed in through each block's skip input, which brings the up-right region). The up pass runs
`n_resnet` blocks per scale, halving the resolution between scales, and keeps every output;
the down pass runs back up the scales and feeds each block the matching output of the up pass:
a `u` block the kept `u`, a `ul` block the new `u` together with the kept `ul`. Mixing them up
(a `u` block fed `ul`) lets `u` read the current row, and the model sees the pixel it predicts;
tests/test_pixelcnn.py checks each stream's field at every block.

With a label, every gated resnet block adds its own projection of it before the gate (a bias
per channel, and one per position from the label maps, at a coarser scale the map of each
cell's top-left pixel: pixelcnn/layers.py LabelBias).
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import field
from core.errors import UserError
from pixelcnn.base import ConvConfig, ConvPrior
from pixelcnn.layers import (DownRightShiftedConv2d, DownRightShiftedDeconv2d,
                             DownShiftedConv2d, DownShiftedDeconv2d, GatedResnet, down_shift,
                             right_shift)


@dataclass
class PixelCNNPPConfig(ConvConfig):
    filters: int = field(32, "channels of both streams at every scale")
    n_resnet: int = field(1, "gated resnet blocks per scale in the up pass (one more in the "
                             "down pass, except at the coarsest scale)")
    n_scales: int = field(2, "resolutions: each further scale halves the rows and columns")
    dropout: float = field(0.1, "dropout inside each gated resnet block")

    def validate(self):
        super().validate()
        if self.n_scales < 1 or self.n_resnet < 1:
            raise UserError("--n_scales and --n_resnet must be at least 1")


class PixelCNNPP(ConvPrior):
    family = "pixelcnnpp"

    def __init__(self, config):
        super().__init__(config, label_dim=config.filters)
        f, scales = config.filters, config.n_scales
        label_dim = f if config.num_classes else 0
        block = partial(GatedResnet, f, label_dim=label_dim, label_maps=self.label_maps,
                        dropout=config.dropout)
        u_block = partial(block, DownShiftedConv2d)
        ul_block = partial(block, DownRightShiftedConv2d)
        # first features, shifted after the convolution: u reads the two rows above (2 x 3),
        # ul the row above (1 x 3) and the column left of the pixel (2 x 1)
        e = config.embed_dim
        self.u_start = DownShiftedConv2d(e, f, (2, 3))
        self.ul_start_above = DownShiftedConv2d(e, f, (1, 3))
        self.ul_start_left = DownRightShiftedConv2d(e, f, (2, 1))
        self.up_u = nn.ModuleList(u_block() for _ in range(scales * config.n_resnet))
        self.up_ul = nn.ModuleList(ul_block(skip_channels=f)
                                   for _ in range(scales * config.n_resnet))
        self.downsize_u = nn.ModuleList(DownShiftedConv2d(f, f, (2, 3), stride=2)
                                        for _ in range(scales - 1))
        self.downsize_ul = nn.ModuleList(DownRightShiftedConv2d(f, f, (2, 2), stride=2)
                                         for _ in range(scales - 1))
        down_blocks = config.n_resnet + (scales - 1) * (config.n_resnet + 1)
        self.down_u = nn.ModuleList(u_block(skip_channels=f) for _ in range(down_blocks))
        self.down_ul = nn.ModuleList(ul_block(skip_channels=2 * f) for _ in range(down_blocks))
        self.upsize_u = nn.ModuleList(DownShiftedDeconv2d(f, f) for _ in range(scales - 1))
        self.upsize_ul = nn.ModuleList(DownRightShiftedDeconv2d(f, f) for _ in range(scales - 1))
        self.out = nn.Conv2d(f, self.head.out_dim, 1)
        self.multiple = 2 ** (scales - 1)  # rows and columns pad to this for the downsizing

    def network(self, grid, label, top=0):
        x = self.embed(grid)
        rows, cols = x.shape[2:]
        # pad below and to the right (after every real pixel in raster order, so nothing real
        # reads them) up to a size that halves evenly at every scale
        x = F.pad(x, (0, -cols % self.multiple, 0, -rows % self.multiple))
        if label is not None:
            label = label.padded(-cols % self.multiple, -rows % self.multiple)
        n_resnet, scales = self.config.n_resnet, self.config.n_scales

        # up pass: keep every output for the down pass
        u_kept = [down_shift(self.u_start(x))]
        ul_kept = [down_shift(self.ul_start_above(x)) + right_shift(self.ul_start_left(x))]
        for scale in range(scales):
            for k in range(scale * n_resnet, (scale + 1) * n_resnet):
                u_kept.append(self.up_u[k](u_kept[-1], label=label))
                ul_kept.append(self.up_ul[k](ul_kept[-1], u_kept[-1], label=label))
            if scale < scales - 1:
                u_kept.append(self.downsize_u[scale](u_kept[-1]))
                ul_kept.append(self.downsize_ul[scale](ul_kept[-1]))

        # down pass: coarsest scale first, each block fed the matching up-pass output
        u, ul = u_kept.pop(), ul_kept.pop()
        k = 0
        for scale in reversed(range(scales)):
            for _ in range(n_resnet + (scale < scales - 1)):
                u = self.down_u[k](u, u_kept.pop(), label=label)
                ul = self.down_ul[k](ul, torch.cat([u, ul_kept.pop()], 1), label=label)
                k += 1
            if scale > 0:
                u, ul = self.upsize_u[scale - 1](u), self.upsize_ul[scale - 1](ul)
        assert not u_kept and not ul_kept
        return self.out(F.elu(ul))[:, :, :rows, :cols]


# the registry's names (priors/__init__.py)
Config, Model = PixelCNNPPConfig, PixelCNNPP
TRAIN_DEFAULTS = {"batch_size": 16, "max_steps": 700, "learning_rate": 2e-3,
                  "weight_decay": 0.0, "eval_every": 175}
