"""Causal convolutions and the blocks the four families share.

Shapes are (B, channels, rows, cols). Two kinds of causal field, in raster order of pixels:

- "above" (PixelCNN++'s u stream, the gated stack's vertical stack after its shift): the
  feature at (i, j) reads pixels of rows < i only, any column within reach;
- "before" (the ul stream, the horizontal stack, a masked convolution's output): the feature
  at (i, j) reads pixels strictly before (i, j): rows < i, or row i with columns < j.

Shifted convolutions (Salimans et al. 2017) get these fields by padding: a DownShiftedConv2d
pads only above and on both sides, so output row i reads input rows <= i; a
DownRightShiftedConv2d pads above and on the left, so output (i, j) reads (<= i, <= j). A
down_shift / right_shift of one row / column then makes "<=" strict. A masked convolution
(van den Oord et al. 2016) zeroes the weights of the kernel's future taps instead.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from priors.dropout import Dropout


# shifts and nonlinearities

def down_shift(x):
    """Move every row one down (zeros in row 0): feature (i, j) <- (i - 1, j)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x):
    """Move every column one right (zeros in column 0): feature (i, j) <- (i, j - 1)."""
    return F.pad(x, (1, 0, 0, 0))[..., :-1]


def concat_elu(x):
    """PixelCNN++'s nonlinearity: ELU of x and of -x, so no sign is lost (2x channels)."""
    return F.elu(torch.cat([x, -x], 1))


def gate(x):
    """Gated activation (van den Oord et al. 2016b): tanh(first half) * sigmoid(second half)."""
    value, gate_ = x.chunk(2, 1)
    return torch.tanh(value) * torch.sigmoid(gate_)


# causal convolutions

class DownShiftedConv2d(nn.Conv2d):
    """Output row i reads input rows i - kh + 1 .. i, columns j - kw//2 .. j + kw//2 (kw odd).
    With stride 2 (downsampling), output (r, c) reads rows 2r - kh + 1 .. 2r."""

    def __init__(self, in_channels, out_channels, kernel=(2, 3), stride=1):
        super().__init__(in_channels, out_channels, kernel, stride=stride)
        kh, kw = kernel
        self.padding_lrtb = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.padding_lrtb))


class DownRightShiftedConv2d(nn.Conv2d):
    """Output (i, j) reads input rows i - kh + 1 .. i and columns j - kw + 1 .. j."""

    def __init__(self, in_channels, out_channels, kernel=(2, 2), stride=1):
        super().__init__(in_channels, out_channels, kernel, stride=stride)
        kh, kw = kernel
        self.padding_lrtb = (kw - 1, 0, kh - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.padding_lrtb))


class DownShiftedDeconv2d(nn.ConvTranspose2d):
    """2x upsampling of an "above" stream: input row r fills output rows 2r and 2r + 1 (and
    columns 2c - 1 .. 2c + 1), so the output keeps the field of its input row."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, (2, 3), stride=2, output_padding=(0, 1))

    def forward(self, x):
        return super().forward(x)[..., 1:-1]  # (2H, 2W + 2) -> (2H, 2W): centre the 3 taps


class DownRightShiftedDeconv2d(nn.ConvTranspose2d):
    """2x upsampling of a "before" stream: input (r, c) fills the 2x2 block at (2r, 2c), all of
    whose pixels come after every pixel the input read."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, (2, 2), stride=2)


def causal_mask(kernel, include_centre):
    """(k, k) mask of the taps a masked convolution keeps: rows above the centre, and the
    centre row left of the centre (type A) or up to and including it (type B)."""
    mask = torch.zeros(kernel, kernel)
    centre = kernel // 2
    mask[:centre] = 1
    mask[centre, :centre + int(include_centre)] = 1
    return mask


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution whose future taps are zero (van den Oord et al. 2016). Type A (the
    first layer) also hides the centre pixel; type B (later layers, whose input at (i, j)
    already reads only pixels before (i, j)) keeps it."""

    def __init__(self, in_channels, out_channels, kernel, mask_type):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        # rebuilt from the arguments, so not saved with the weights
        self.register_buffer("mask", causal_mask(kernel, mask_type == "B"), persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    # one output position at a time, for sampling (pixelcnn/pixelcnn.py)

    def new_cache(self, batch, height, width):
        """For at(): a zero input map padded by half the kernel on every side, and the masked
        weights as a matrix (the weights do not change while sampling)."""
        pad = self.kernel_size[0] // 2
        return {"input": self.weight.new_zeros(batch, self.in_channels, height + 2 * pad,
                                               width + 2 * pad),
                "weight": (self.weight * self.mask).flatten(1)}  # (out, in * k * k)

    def store(self, cache, row, col, x):
        """Write x (B, in, 1, 1) into the cached input map as the input at (row, col)."""
        pad = self.kernel_size[0] // 2
        cache["input"][:, :, row + pad, col + pad] = x[:, :, 0, 0]

    def at(self, cache, row, col, x=None):
        """The output at (row, col) alone, (B, out, 1, 1), from the cached input map (after
        storing x there, when given). Exact once the cache holds every input before (row, col)
        (and at it, for type B): the mask zeroes the taps of the others."""
        if x is not None:
            self.store(cache, row, col, x)
        k = self.kernel_size[0]
        patch = cache["input"][:, :, row:row + k, col:col + k].flatten(1)  # (B, in * k * k)
        # one k x k window is a matrix product (a convolution call costs more than its work)
        return F.linear(patch, cache["weight"], self.bias)[:, :, None, None]


# labels

@dataclass
class Label:
    """A class label as the layers take it: its vector (B, D), and its maps (B, M, rows, W) for
    the rows the network computes (None: a model without label maps)."""
    vector: torch.Tensor
    maps: torch.Tensor = None

    def rows(self, top, count):
        """The label for rows top .. top + count - 1 of the grid (a row crop of the maps)."""
        maps = self.maps[:, :, top:top + count] if self.maps is not None else None
        return Label(self.vector, maps)

    def padded(self, right, below):
        """The label for the grid padded by `right` columns and `below` rows (PixelCNN++)."""
        maps = F.pad(self.maps, (0, right, 0, below)) if self.maps is not None else None
        return Label(self.vector, maps)

    def at(self, row, col):
        """The label for pixel (row, col) alone (PixelCNN's cached sampler)."""
        maps = self.maps[:, :, row:row + 1, col:col + 1] if self.maps is not None else None
        return Label(self.vector, maps)


class LabelBias(nn.Linear):
    """A layer's label term, added to its pre-activation (B, out, h, w): a per-channel bias
    projected from the label's vector (this nn.Linear), plus a 1x1 projection of the label's
    maps: a bias per class *and position*, so a class can say where ink goes, not only how
    much. The maps hold no pixel, so any position may read them without breaking causality."""

    def __init__(self, label_dim, map_channels, out_channels):
        super().__init__(label_dim, out_channels)
        self.map = nn.Conv2d(map_channels, out_channels, 1, bias=False) if map_channels else None

    def forward(self, label, pre_activation):
        """label: a Label; pre_activation: what the term is added to, (B, C, h, w), which sets
        the resolution -> (B, out, h, w), or (B, out, 1, 1) without maps."""
        out = super().forward(label.vector)[:, :, None, None]
        if self.map is None:
            return out
        # a coarser scale of PixelCNN++ takes the map at each cell's top-left pixel (not a mean
        # with the rows below, which a row-cropped grid pads with zeros)
        step = label.maps.shape[3] // pre_activation.shape[3]
        return out + self.map(label.maps[:, :, ::step, ::step])


# blocks

class GatedResnet(nn.Module):
    """PixelCNN++'s gated residual block: x + gate(conv(concat_elu(conv(concat_elu(x)) +
    1x1(concat_elu(skip))))), with the label's own bias added before the gate. `conv` is the
    causal convolution class of the stream (its field is the block's field); the optional
    `skip` input (a tensor of `skip_channels`) must have the same field or a narrower one."""

    def __init__(self, filters, conv, skip_channels=0, label_dim=0, label_maps=0, dropout=0.0):
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.skip = nn.Conv2d(2 * skip_channels, filters, 1) if skip_channels else None
        self.dropout = Dropout(dropout)
        self.conv_out = conv(2 * filters, 2 * filters)
        self.label = LabelBias(label_dim, label_maps, 2 * filters) if label_dim else None

    def forward(self, x, skip=None, label=None):
        """x (B, F, H, W), skip (B, S, H, W) or None, label (a Label) or None."""
        hidden = self.conv_in(concat_elu(x))
        if skip is not None:
            hidden = hidden + self.skip(concat_elu(skip))
        hidden = self.conv_out(self.dropout(concat_elu(hidden)))  # (B, 2F, H, W)
        if label is not None:
            hidden = hidden + self.label(label, hidden)
        value, gate_ = hidden.chunk(2, 1)
        return x + value * torch.sigmoid(gate_)


class CausalAttention(nn.Module):
    """PixelSNAIL's attention over the pixels of a grid in raster order, `heads` heads.

    Queries come from the stream (whose feature at p reads pixels before p); keys and values
    also see the input pixels themselves, so position p may attend only to positions strictly
    before p — never to itself. The first position has nothing to attend to: its output is 0.
    """

    def __init__(self, query_channels, key_channels, key_dim, value_dim, heads=1):
        super().__init__()
        self.heads = heads
        self.query = nn.Conv2d(query_channels, key_dim, 1)
        self.key = nn.Conv2d(key_channels, key_dim, 1)
        self.value = nn.Conv2d(key_channels, value_dim, 1)

    def forward(self, query_input, key_input):
        """query_input (B, Cq, H, W), key_input (B, Ck, H, W) -> (B, value_dim, H, W)."""
        b, _, h, w = query_input.shape
        split = lambda x: x.view(b, self.heads, -1, h * w)  # (B, nh, channels / nh, HW)
        q = split(self.query(query_input)).transpose(2, 3)       # (B, nh, HW, dk)
        k = split(self.key(F.elu(key_input)))                    # (B, nh, dk, HW)
        v = split(self.value(F.elu(key_input))).transpose(2, 3)  # (B, nh, HW, dv)
        scores = q @ k / math.sqrt(q.shape[-1])                  # (B, nh, HW, HW)
        earlier = torch.ones(h * w, h * w, dtype=torch.bool, device=q.device).tril(-1)
        # Row 0 has no earlier position: let its softmax see itself (so it stays finite), then
        # multiply by the strict mask, which zeroes that weight: its output is exactly 0.
        finite = earlier.clone()
        finite[0, 0] = True
        weights = scores.masked_fill(~finite, float("-inf")).softmax(-1) * earlier
        out = weights @ v                                        # (B, nh, HW, dv)
        return out.transpose(2, 3).reshape(b, -1, h, w)
