"""The transformer block shared by the transformer priors (gpt.py, absorbing.py), and their
softmax attention.

A block is pre-LayerNorm, as GPT-2: x + attn(ln1(x)), then x + mlp(ln2(x)). It is given its
attention module, which reads the normalised input and whatever else the block's caller passes
(a mask, a sampling cache, ...):
    SelfAttention(config)                 causal softmax, with a KV cache and an optional mask
                                          (gpt.py: full causal or a local window)
    SelfAttention(config, causal=False)   bidirectional softmax (absorbing.py)
    LinearAttention(config)               linear / momentum attention (attention.py)
Every kind has the same parameters, `qkv` and `proj`, so the state-dict keys are the same
(blocks.0.ln1.weight, blocks.0.attn.qkv.weight, blocks.0.mlp.0.weight, ...), and init.py's GPT-2
initialisation finds the residual projections by name (attn.proj.weight, mlp.2.weight).
"""

import torch.nn as nn
import torch.nn.functional as F

from priors.dropout import Dropout


class SelfAttention(nn.Module):
    """Multi-head softmax attention. Causal: position t reads positions <= t, or what `mask`
    allows; with a KVCache, keys and values are written into it and read back from it.
    Bidirectional (causal=False): every position reads every position, with no mask tensor, so
    the fused scaled_dot_product_attention kernel runs."""

    def __init__(self, config, causal=True):
        super().__init__()
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, causal
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.proj_dropout = Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None, layer=0, start=0):
        """x (B, L, C) at positions start..start+L-1; mask (L, start+L) bool, or None: causal
        attention for L > 1, and for one query (a sampling step) every key up to it."""
        b, length, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, length, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in (q, k, v))  # (B, nh, L, hs)
        if cache is not None:
            cache.k[layer, :, :, start:start + length] = k
            cache.v[layer, :, :, start:start + length] = v
            k = cache.k[layer, :, :, :start + length]  # (B, nh, start+L, hs)
            v = cache.v[layer, :, :, :start + length]
        dropout = self.dropout if self.training else 0.0
        # is_causal aligns the queries with the first keys, so a lone query (the newest
        # position) takes no mask at all: it reads the whole cache
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=self.causal and mask is None and length > 1)
        y = y.transpose(1, 2).contiguous().view(b, length, c)
        return self.proj_dropout(self.proj(y))


class Block(nn.Module):
    """LayerNorm, the given attention, LayerNorm, MLP (4x wide, GELU, dropout on its output),
    each added to the residual stream. forward(x, *args) passes *args on to the attention."""

    def __init__(self, config, attention):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = attention
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd),
                                 Dropout(config.dropout))

    def forward(self, x, *args):
        x = x + self.attn(self.ln1(x), *args)
        return x + self.mlp(self.ln2(x))
