"""GPT-2's weight initialisation, shared by the transformer priors (gpt.py, absorbing.py)."""

import math

import torch.nn as nn


def _normal(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def init_gpt2(model, n_layer):
    """N(0, 0.02) weights and zero biases for every linear and embedding layer, then the
    residual projections (attention output, MLP output) at 0.02 / sqrt(2 n_layer), so that the
    residual stream's variance does not grow with depth."""
    model.apply(_normal)
    for name, p in model.named_parameters():
        if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
