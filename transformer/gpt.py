"""A decoder-only transformer over the raster sequence of a token grid (the `gpt` prior).

Position t of the sequence predicts token t (row t // grid_w, column t % grid_w) and reads the
token before it: a start token (id = vocab_size) at t = 0, token t-1 after that. So
`forward(tokens)` returns, for every position, head outputs that depend only on earlier tokens
— every token is scored, the first one included. A class label, when the prior is conditional,
is added to every position's input (so a local window cannot hide it).

`attention` picks how positions read each other: `softmax` (transformer/block.py; with
`window_size` set, position t attends only to positions s <= t whose grid cells are within
`window_size` rows and columns of t's, a local 2-D causal window, the mask built here), or
`linear` / `momentum` / `adaptive_momentum` (transformer/attention.py: trained in parallel,
sampled by a recurrence on a fixed-size state). Sampling runs one forward step per new token on
a cache of the kind's own: keys and values for softmax (KVCache), the running sums for the
linear kinds (RecurrentState). With any kind, `res_mu`, `res_stepsize`, `adaptive_type nc` or
`is_resw` give the attention's residual connection momentum across layers
(transformer/block.py's MomentumBlock), which needs nothing kept between sampling steps.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from core.config import field
from core.errors import UserError
from priors.base import PriorConfig, RasterPrior
from priors.dropout import Dropout
from priors.settings import SamplingConfig
from transformer.attention import LinearAttention, RecurrentState
from transformer.block import Block, MomentumBlock, SelfAttention
from transformer.init import init_gpt2

ATTENTION_KINDS = ("softmax", "linear", "momentum", "adaptive_momentum")
ADAPTIVE_TYPES = ("none", "nc")


@dataclass
class GPTConfig(PriorConfig):
    n_layer: int = field(4, "transformer blocks")
    n_head: int = field(4, "attention heads")
    n_embd: int = field(128, "width of the transformer")
    dropout: float = field(0.1, "dropout on embeddings, attention and MLP outputs")
    window_size: Optional[int] = field(None, "attend only to earlier tokens within this many "
                                             "rows and columns (default: full causal attention)")
    attention: str = field("softmax", "softmax | linear (elu+1 features) | momentum (linear "
                                      "attention with momentum) | adaptive_momentum (momentum "
                                      "computed at every position)")
    mu: float = field(0.6, "momentum attention: the momentum, in [0, 1)")
    # a key d positions back weighs s (1 - mu^(d+1)) / (1 - mu), from s up to s / (1 - mu)
    stepsize: float = field(0.4, "momentum and adaptive_momentum attention: the step size s")
    delta: float = field(1e-4, "adaptive_momentum attention: the momentum stays <= 1 - delta")
    # the residual connection around attention, with momentum across layers (MomentumBlock);
    # res_mu 0, res_stepsize 1, adaptive_type none, no is_resw: the plain x + attention
    res_mu: float = field(0.0, "momentum of the residual connection across layers, in [0, 1)")
    res_stepsize: float = field(1.0, "step size of the residual connection")
    adaptive_type: str = field("none", "none | nc: the residual connection's momentum computed "
                                       "at every layer and position (instead of --res_mu)")
    res_delta: float = field(1e-4, "--adaptive_type nc: the momentum stays <= 1 - res_delta")
    is_resw: bool = field(False, "residual connection with two learned maps, W x - s W' v "
                                 "(they start as the identity)")

    @property
    def momentum_residual(self):
        """Whether the residual connection is MomentumBlock's rather than the plain one."""
        return (self.res_mu != 0 or self.res_stepsize != 1 or self.adaptive_type != "none"
                or self.is_resw)

    def validate(self):
        super().validate()
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd {self.n_embd} is not divisible by --n_head {self.n_head}")
        if self.window_size is not None and self.window_size < 0:
            raise UserError(f"--window_size must be >= 0, got {self.window_size}")
        if self.attention not in ATTENTION_KINDS:
            raise UserError(f"--attention must be one of {', '.join(ATTENTION_KINDS)}, got "
                            f"'{self.attention}'")
        if self.attention != "softmax" and self.window_size is not None:
            raise UserError("--window_size works with --attention softmax only (a running sum "
                            "cannot drop the keys that leave a window)")
        if not 0 <= self.mu < 1 or self.stepsize <= 0:
            raise UserError(f"--mu must be in [0, 1) and --stepsize positive, got {self.mu} and "
                            f"{self.stepsize}")
        if not 0 < self.delta < 1 or not 0 < self.res_delta < 1:
            raise UserError(f"--delta and --res_delta must be in (0, 1), got {self.delta} and "
                            f"{self.res_delta}")
        if self.attention != "adaptive_momentum" and self.delta != 1e-4:
            raise UserError(f"--delta is adaptive_momentum attention's (the bound on its "
                            f"momentum); --attention is {self.attention}")
        if not 0 <= self.res_mu < 1 or self.res_stepsize <= 0:
            raise UserError(f"--res_mu must be in [0, 1) and --res_stepsize positive, got "
                            f"{self.res_mu} and {self.res_stepsize}")
        if self.adaptive_type not in ADAPTIVE_TYPES:
            raise UserError(f"--adaptive_type must be one of {', '.join(ADAPTIVE_TYPES)}, got "
                            f"'{self.adaptive_type}'")
        if self.adaptive_type == "nc" and self.res_mu != 0:
            raise UserError("--adaptive_type nc computes the residual connection's momentum "
                            "itself: drop --res_mu")
        if self.adaptive_type != "nc" and self.res_delta != 1e-4:
            raise UserError("--res_delta bounds the momentum of --adaptive_type nc, which is "
                            "not set")


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

def make_attention(config):
    """The attention layer of config.attention (configs without the field: softmax)."""
    if getattr(config, "attention", "softmax") == "softmax":
        return SelfAttention(config)
    return LinearAttention(config)


class GPT(RasterPrior):
    family = "gpt"

    def __init__(self, config):
        super().__init__(config)
        self.start_token = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size + 1, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.label_embedding = self.make_label_embedding(config.n_embd)
        self.dropout = Dropout(config.dropout)
        block = MomentumBlock if config.momentum_residual else Block
        self.blocks = nn.ModuleList(block(config, make_attention(config))
                                    for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head_proj = nn.Linear(config.n_embd, self.head.out_dim, bias=False)
        # The window mask is a buffer (moves with .to(device)) but not state: rebuilt from config.
        windowed = config.window_size is not None
        self.register_buffer("mask", attention_mask(config.grid_h, config.grid_w,
                                                    config.window_size) if windowed else None,
                             persistent=False)
        init_gpt2(self, config.n_layer)
        if config.momentum_residual:
            for block in self.blocks:
                block.reset_residual_weights()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the prior family called the output projection `head`
        old, new = prefix + "head.weight", prefix + "head_proj.weight"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _run(self, tokens, start=0, cache=None, labels=None, hidden=None):
        """tokens (B, L) at positions start..start+L-1 -> head outputs (B, L, out_dim). With
        a list `hidden`, append the residual stream (B, L, n_embd) at the input and after each
        block."""
        length = tokens.shape[1]
        if start + length > self.config.block_size:  # a slice would silently come up short
            raise ValueError(f"positions {start}..{start + length - 1} are past the grid's "
                             f"{self.config.block_size}")
        x = self.token_embedding(tokens) + self.position_embedding.weight[start:start + length]
        if labels is not None:
            x = x + self.label_embedding(labels)[:, None]
        x = self.dropout(x)
        if self.mask is not None:
            mask = self.mask[start:start + length, :start + length]
        elif self.config.attention != "softmax":
            mask = None  # the linear kinds are causal by construction
        elif cache is not None and start > 0 and length > 1:
            # queries at start.. see every key up to themselves: a shifted causal mask
            mask = torch.ones(length, start + length, dtype=torch.bool,
                              device=tokens.device).tril(diagonal=start)
        else:
            mask = None  # plain causal (fused kernel), or one query that sees everything
        if hidden is not None:
            hidden.append(x)
        carry = None  # MomentumBlock's velocity and attention output, up the layers
        for layer, block in enumerate(self.blocks):
            if self.config.momentum_residual:
                x, carry = block(x, carry, mask, cache, layer, start)
            else:
                x = block(x, mask, cache, layer, start)
            if hidden is not None:
                hidden.append(x)
        return self.head_proj(self.ln_f(x))

    def _inputs(self, codes):
        """(B, T) tokens -> (B, T) inputs: the start token, then every token but the last."""
        start = torch.full((codes.shape[0], 1), self.start_token, dtype=codes.dtype,
                           device=codes.device)
        return torch.cat([start, codes[:, :-1]], dim=1)

    def forward(self, tokens, labels=None, hidden=None):
        """tokens (B, h, w) or (B, T) -> head outputs (B, T, out_dim) predicting each token
        from those before it, and the mean negative log-likelihood in nats per token. With a
        list `hidden`, also append the per-layer residual streams (see hidden_states)."""
        codes = tokens.reshape(tokens.shape[0], -1)
        b, t = codes.shape
        labels = self.training_labels(labels, b, codes.device)
        out = self._run(self._inputs(codes), labels=labels, hidden=hidden)
        loss = self.head.nll(out, codes[..., None]).mean()
        return out, loss

    def hidden_states(self, tokens, labels=None):
        """tokens (B, h, w) -> [(B, T, n_embd)] * (n_layer + 1): the residual stream at the
        input and after each block, position t having read the tokens before t (as in forward).
        Image GPT's probes pool these."""
        hidden = []
        self(tokens, labels, hidden=hidden)
        return hidden

    # incremental decoding: a KV cache (softmax) or the running sums (the linear kinds)

    def new_cache(self, batch_size, device=None, dtype=None):
        parameter = next(self.parameters())
        if self.config.attention != "softmax":
            return RecurrentState(self.config, batch_size, device or parameter.device)
        return KVCache(self.config, batch_size, device or parameter.device,
                       dtype or parameter.dtype)

    def forward_cached(self, tokens, cache, start, labels=None):
        """Incremental forward: input tokens (B, L) at positions start.. (the start token at
        0, then token t-1 at position t); returns head outputs (B, L, out_dim)."""
        return self._run(tokens, start, cache, labels)

    # the raster sampler's hooks (priors/sampling.py)

    def begin(self, batch, labels, cache_dtype=None):
        dtype = CACHE_DTYPES[cache_dtype] if cache_dtype else None  # None: the weights' (fp32)
        return {"cache": self.new_cache(batch, dtype=dtype), "labels": labels}

    def begin_options(self, settings):
        # getattr: a sampling dataclass registered in place of GPTSampling may lack the field
        return {"cache_dtype": getattr(settings, "cache_dtype", None)}

    def step(self, state, p, tokens):
        previous = (torch.full_like(tokens[:, 0, :1], self.start_token) if p == 0
                    else tokens[:, p - 1, :1])  # (B, 1)
        return self._run(previous, p, state["cache"], state["labels"])[:, -1]


@torch.no_grad()
def sample_without_cache(model, num_samples, temperature=1.0, generator=None, labels=None):
    """The slow reference: re-run the whole prefix at every step (for benchmarks and tests)."""
    from priors.sampling import draw
    model.eval()
    config = model.config
    device = next(model.parameters()).device
    codes = torch.zeros(num_samples, config.block_size, dtype=torch.long, device=device)
    for t in range(config.block_size):
        out, _ = model(codes[:, :t + 1], labels)  # position t reads codes < t only
        log_p = model.head.log_probs(out[:, t], model.head.begin(out[:, t]), 0)
        codes[:, t] = draw(log_p, temperature, generator=generator)
    return codes.view(num_samples, config.grid_h, config.grid_w)


# sampling settings

# The KV cache's dtypes. fp32 by default, also under bf16 autocast, where the attention then
# runs in fp32 on the cache as stored (transformer/block.py). Under bf16 autocast the cached keys
# and values are the qkv projection's bf16 outputs either way, so a bf16 cache loses only the
# fp32 attention arithmetic and halves the bytes a step reads; in an fp32 forward it rounds
# them to 8 bits of mantissa. The softmax statistics are fp32 in every case (the attention
# kernels accumulate in fp32). The linear kinds' RecurrentState is fp32 whatever is asked.
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class GPTSampling(SamplingConfig):
    """The GPT's sampling settings: those of every prior, and the KV cache's dtype."""
    cache_dtype: Optional[str] = field(None, "softmax attention's KV cache: fp32 (unset: this "
                                             "one) or bf16 (half the memory and the bytes read "
                                             "per step)")

    def validate(self, where="--{}"):
        super().validate(where)
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise UserError(f"{where.format('cache_dtype')} must be one of "
                            f"{', '.join(CACHE_DTYPES)}, got '{self.cache_dtype}'")


# the registry's names (priors/__init__.py)
Config, Model, Sampling = GPTConfig, GPT, GPTSampling
TRAIN_DEFAULTS = {}
