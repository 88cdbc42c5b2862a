"""A decoder-only transformer over the row-major sequence of VQ codes of one image.

Position t of the sequence predicts code t (row t // grid_w, column t % grid_w) and reads the
token before it: a start-of-image token (id = vocab_size) at t = 0, code t-1 after that. So
`forward(codes)` returns, for every position, logits that depend only on earlier codes.

With `window_size` set, position t attends only to positions s <= t whose grid cells are within
`window_size` rows and columns of t's (a local 2-D causal window). Generation uses a KV cache:
one forward step per new code.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 512      # codebook size K; the start token is id K
    grid_h: int = 16           # code grid rows
    grid_w: int = 16           # code grid columns; the sequence length is grid_h * grid_w
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    window_size: Optional[int] = None  # local 2-D causal window radius in cells; None = full

    @property
    def block_size(self):
        return self.grid_h * self.grid_w

    def validate(self):
        from pipeline.errors import UserError
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd {self.n_embd} is not divisible by --n_head {self.n_head}")
        if self.window_size is not None and self.window_size < 0:
            raise UserError(f"--window_size must be >= 0, got {self.window_size}")


# helpers

def attention_mask(grid_h, grid_w, window_size=None):
    """(T, T) bool, True where query position t may attend to key position s."""
    t = torch.arange(grid_h * grid_w)
    allowed = t[:, None] >= t[None, :]  # causal
    if window_size is not None:
        rows, cols = t // grid_w, t % grid_w
        allowed &= (rows[:, None] - rows[None, :]).abs() <= window_size
        allowed &= (cols[:, None] - cols[None, :]).abs() <= window_size
    return allowed


class KVCache:
    """Preallocated keys and values, (n_layer, B, n_head, T, head_dim) each: filling in place
    avoids re-allocating (and copying) the cache at every step."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size,
                 config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)


# main classes

class SelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.proj_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, cache=None, layer=0, start=0):
        """x (B, L, C) at positions start..start+L-1; mask (L, start+L) bool, or None for
        plain causal attention over a full sequence."""
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
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(b, length, c)
        return self.proj_dropout(self.proj(y))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd),
                                 nn.Dropout(config.dropout))

    def forward(self, x, mask, cache=None, layer=0, start=0):
        x = x + self.attn(self.ln1(x), mask, cache, layer, start)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        self.start_token = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size + 1, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # The window mask is a buffer (moves with .to(device)) but not state: rebuilt from config.
        windowed = config.window_size is not None
        self.register_buffer("mask", attention_mask(config.grid_h, config.grid_w,
                                                    config.window_size) if windowed else None,
                             persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _run(self, tokens, start=0, cache=None):
        """tokens (B, L) at positions start..start+L-1 -> logits (B, L, vocab_size)."""
        length = tokens.shape[1]
        positions = torch.arange(start, start + length, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        if self.mask is not None:
            mask = self.mask[start:start + length, :start + length]
        elif cache is not None and (start > 0 or length > 1):
            # queries at start.. see every key up to themselves: a shifted causal mask
            mask = torch.ones(length, start + length, dtype=torch.bool,
                              device=tokens.device).tril(diagonal=start)
        else:
            mask = None  # plain causal (fused kernel), or one query that sees everything
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer, start)
        return self.head(self.ln_f(x))

    def forward(self, codes):
        """codes (B, T) -> logits (B, T, K) predicting each code from those before it, and
        the mean cross-entropy loss in nats per code."""
        b, t = codes.shape
        start = torch.full((b, 1), self.start_token, dtype=codes.dtype, device=codes.device)
        logits = self._run(torch.cat([start, codes[:, :-1]], dim=1))
        loss = F.cross_entropy(logits.float().reshape(b * t, -1), codes.reshape(b * t))
        return logits, loss

    def new_cache(self, batch_size, device=None, dtype=None):
        parameter = next(self.parameters())
        return KVCache(self.config, batch_size, device or parameter.device,
                       dtype or parameter.dtype)

    def step(self, tokens, cache, start):
        """Incremental forward: tokens (B, L) at positions start..; returns logits (B, L, K)."""
        return self._run(tokens, start, cache)


def gpt_from_checkpoint(checkpoint):
    model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()

