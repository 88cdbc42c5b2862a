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

MomentumBlock is the GPT's block when its residual connection carries momentum across layers
(`--res_mu`, `--res_stepsize`, `--adaptive_type nc`, `--is_resw`); with none of them the GPT
uses Block, so models and checkpoints without these settings are unchanged.
"""

import torch
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
        causal = self.causal and mask is None and length > 1
        if k.dtype == torch.float32 and q.dtype != k.dtype:
            # an fp32 cache under autocast: attention in fp32 on the cache as it is stored, not
            # on a bf16 copy of every cached key and value made at every step (1.3x slower)
            with torch.autocast(x.device.type, enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask,
                                                   dropout_p=dropout, is_causal=causal)
        else:  # (a bf16 cache in an fp32 forward: the keys and values read back in fp32)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                               dropout_p=dropout, is_causal=causal)
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


TINY = 1e-12  # keeps adaptive momentum's ratio of norms (and its gradient) finite


def residual_momentum(attended, attended_before, velocity_before, res_delta):
    """Adaptive momentum of the residual connection (`--adaptive_type nc`), per position:
    mu = clip((1 - sqrt(|A_l - A_{l-1}| / |v_{l-1}|))^2, 0, 1 - res_delta), norms over the
    channels of (B, L, C) tensors -> (B, L, 1), in fp32."""
    def squared_norm(t):
        return t.float().pow(2).sum(-1, keepdim=True)
    ratio = ((squared_norm(attended - attended_before) + TINY)
             / (squared_norm(velocity_before) + TINY)) ** 0.25  # sqrt of the norms' ratio
    return ((1 - ratio) ** 2).clamp(0, 1 - res_delta)


class MomentumBlock(Block):
    """Block with momentum in the attention's residual connection, across layers (the Momentum
    Transformer's momentum connection, Nguyen et al. 2022; the seed's `--res_mu --res_stepsize`,
    its adaptive momentum `--adaptive_type nc --res_delta`, and `--is_resw`):

        A_l = attn(ln1(x_{l-1}))             this block's attention output, (B, L, C)
        v_l = mu_l v_{l-1} - A_l             the velocity (before the first block v = 0)
        x   = x_{l-1} - s v_l                --is_resw: W x_{l-1} - s W' v_l (two C x C maps)
        x_l = x + mlp(ln2(x))

    mu_l is --res_mu, or with --adaptive_type nc computed at every position from the change of
    the attention output between layers (residual_momentum). res_mu = 0 and s = 1 give the
    plain residual x + A_l. Written from the authors' public code (fast_transformers/
    transformers.py: TransformerMomentumEncoderLayer, TransformerAdaptiveEncoderLayer, whose
    "nc" is the default branch of its adaptive_type; the paper's own equation numbers were not
    available to check). Deviations: the seed's blocks are post-LN (LayerNorm after each sum),
    these are this GPT's pre-LN; --is_resw's two maps start as the identity (the seed's start
    random), so that training starts from the momentum connection itself; 1e-12 on both sides of
    the ratio keeps it finite where the seed would divide by zero.

    The velocity runs up the layers of one position, not along the sequence: v_l at position t
    is made of A_1..A_l at t, each of which reads positions <= t. So the parallel forward and a
    one-token sampling step compute the same velocity, and sampling keeps nothing for it between
    steps: it is made and dropped inside each forward (the attention's own cache is unchanged).

    forward(x, carry, *args) -> (x, carry), carry = (v_l, A_l) for the next block (None before
    the first); *args go to the attention as in Block."""

    def __init__(self, config, attention):
        super().__init__(config, attention)
        self.res_mu, self.res_stepsize = config.res_mu, config.res_stepsize
        self.res_delta = config.res_delta if config.adaptive_type == "nc" else None
        if config.is_resw:
            self.residual_weight = nn.Linear(config.n_embd, config.n_embd)  # W
            self.velocity_weight = nn.Linear(config.n_embd, config.n_embd)  # W'
        else:
            self.residual_weight = self.velocity_weight = None

    @torch.no_grad()
    def reset_residual_weights(self):
        """--is_resw's maps to the identity (after the model's random initialisation)."""
        for linear in (self.residual_weight, self.velocity_weight):
            if linear is not None:
                linear.weight.copy_(torch.eye(linear.in_features))
                linear.bias.zero_()

    def forward(self, x, carry, *args):
        attended = self.attn(self.ln1(x), *args)
        if carry is None:
            velocity = -attended
        else:
            velocity_before, attended_before = carry
            mu = (self.res_mu if self.res_delta is None else
                  residual_momentum(attended, attended_before, velocity_before,
                                    self.res_delta).to(attended.dtype))
            velocity = mu * velocity_before - attended
        if self.residual_weight is None:
            x = x - self.res_stepsize * velocity
        else:
            x = self.residual_weight(x) - self.res_stepsize * self.velocity_weight(velocity)
        return x + self.mlp(self.ln2(x)), (velocity, attended)
