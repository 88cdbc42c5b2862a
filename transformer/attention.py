"""Linear attention kinds for the GPT (`--attention linear | momentum`): causal linear attention
(Katharopoulos et al. 2020, "Transformers are RNNs") and its momentum recurrence (Nguyen et al.
2022, "Momentum Transformer"), each trained in a parallel form and sampled in a recurrent form.

Queries and keys go through the feature map phi(x) = elu(x) + 1, which is positive, so the
normaliser below is positive. Query i reads

    y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),      z_i = sum_{j<=i} phi(k_j)

with the (head_dim x head_dim) matrix S_i built by a recurrence over the keys and values:

    linear:    S_i = S_{i-1} + phi(k_i) v_i^T
    momentum:  P_i = mu P_{i-1} - s phi(k_i) v_i^T,    S_i = S_{i-1} - P_i

Unrolled, both weight key j at query i by a function of their distance:

    S_i = sum_{j<=i} w(i - j) phi(k_j) v_j^T,      w(d) = s (1 - mu^(d+1)) / (1 - mu)

(linear attention is mu = 0, s = 1: w = 1). The weight depends on the distance to the *query*,
and the parallel form computes exactly that at every position, so training fits the function
that the recurrent sampler evaluates. (Weighting keys by their distance to the end of the
sequence instead, as a parallel form written for whole sequences may, trains one model and
samples another.)

The normaliser z: momentum acts on S only; z stays linear attention's running sum of phi(k).
Were z given the same momentum, s would cancel between numerator and denominator and
`--stepsize` would do nothing. So w(d) lies in [s, s / (1 - mu)]: each output is a positively
weighted average of the values, scaled by at most s / (1 - mu), at any sequence length.

Parallel form (training, and a prompt given at once): chunks of CHUNK positions. Inside a chunk
the (c x c) matrix of w(i - j) phi(q_i)^T phi(k_j), across chunks the state carried from the
chunk before — exact, in O(T c d + T d^2) time and memory linear in T. Recurrent form
(sampling): the literal recurrence above, one token per step, on a state of fixed size — per
layer and head S (d x d), z (d) and, for momentum, P (d x d), all in fp32 — so a step costs the
same at token 10 and token 3,000.

No attention dropout: there is no attention matrix in the recurrent form to drop from; the
output projection's dropout still applies.

Not built, of the momentum paper: momentum in the residual connections (a change to how blocks
are chained, across layers, not to attention) and adaptive momentum (mu re-estimated from the
data at every step, so that a key's weight depends on more than its distance to the query and
the chunked form above no longer applies as it stands).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from priors.dropout import Dropout

CHUNK = 64   # positions per chunk of the parallel form
EPS = 1e-6   # keeps the normaliser away from zero when every phi(q)^T phi(k) underflows


# helpers

def feature_map(x):
    """phi(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1


def key_weights(distance, mu, stepsize):
    """w(d) = s (1 - mu^(d+1)) / (1 - mu): the weight of a key d positions before the query."""
    return stepsize * (1 - mu ** (distance + 1)) / (1 - mu)


class RecurrentState:
    """The sampler's memory for linear attention, fixed in size whatever the position:
    S (n_layer, B, nh, hs, hs), z (n_layer, B, nh, hs) and, with momentum, P like S; fp32."""

    def __init__(self, config, batch_size, device):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, head_dim)
        self.S = torch.zeros(*shape, head_dim, device=device)
        self.z = torch.zeros(shape, device=device)
        self.P = torch.zeros_like(self.S) if config.attention == "momentum" else None

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.P) if t is not None)


# main class

class LinearAttention(nn.Module):
    """Causal linear attention; with config.attention == "momentum", the momentum recurrence
    (mu = config.mu, s = config.stepsize). Same parameters as softmax attention (qkv, proj)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.momentum = config.attention == "momentum"
        self.mu, self.stepsize = (config.mu, config.stepsize) if self.momentum else (0.0, 1.0)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.proj_dropout = Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None, layer=0, start=0):
        """x (B, L, C) at positions start..start+L-1 -> (B, L, C). `mask` is softmax
        attention's and unused here; `cache` is a RecurrentState (None: a whole sequence)."""
        b, length, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (part.view(b, length, self.n_head, c // self.n_head).transpose(1, 2).float()
                   .contiguous() for part in (q, k, v))  # (B, nh, L, hs), fp32 under autocast
        # the sums run in fp32 even under bf16 autocast (which would cast matmuls back down)
        with torch.autocast(x.device.type, enabled=False):
            q, k = feature_map(q), feature_map(k)
            if cache is not None and length == 1:
                y = self._step(q, k, v, cache, layer)
            else:
                state = self._state_of(cache, layer, b, q)
                y = self._chunks(q, k, v, state)
                if cache is not None:
                    for name, value in state.items():
                        getattr(cache, name)[layer] = value
        y = y.to(x.dtype).transpose(1, 2).reshape(b, length, c)
        return self.proj_dropout(self.proj(y))

    # the recurrent form: one token

    def _step(self, q, k, v, cache, layer):
        """q, k, v (B, nh, 1, hs): update this layer's state in place, read it with q."""
        S, z = cache.S[layer], cache.z[layer]
        kv = k.transpose(-1, -2) @ v  # (B, nh, hs, hs): phi(k) v^T
        if self.momentum:
            P = cache.P[layer]
            P.mul_(self.mu).sub_(kv, alpha=self.stepsize)  # P_i = mu P_{i-1} - s phi(k_i) v_i^T
            S.sub_(P)                                      # S_i = S_{i-1} - P_i
        else:
            S.add_(kv)
        z.add_(k[:, :, 0])
        return (q @ S) / (q @ z[..., None] + EPS)  # (B, nh, 1, hs)

    # the parallel form: chunks, each starting from the state the chunk before left

    def _state_of(self, cache, layer, batch, like):
        if cache is not None:
            state = {"S": cache.S[layer], "z": cache.z[layer]}
            if self.momentum:
                state["P"] = cache.P[layer]
            return state
        head_dim = like.shape[-1]
        S = like.new_zeros(batch, self.n_head, head_dim, head_dim)
        state = {"S": S, "z": like.new_zeros(batch, self.n_head, head_dim)}
        if self.momentum:
            state["P"] = torch.zeros_like(S)
        return state

    def _chunks(self, q, k, v, state):
        """q, k (features), v: (B, nh, T, hs); `state` (S, z[, P]) before position 0, updated
        to the state after position T-1. Returns (B, nh, T, hs)."""
        # split, not slices: a slice's backward writes into a zero tensor of the whole input
        chunks = zip(*(t.split(CHUNK, dim=2) for t in (q, k, v)))
        return torch.cat([self._chunk(*chunk, state) for chunk in chunks], 2)

    def _chunk(self, q, k, v, state):
        """One chunk of c positions t = 0..c-1 from the state (S0, z0, P0) before it. Unrolling
        the recurrence inside the chunk:
            S_t = S0 - g_t P0 + sum_{j<=t} w(t - j) phi(k_j) v_j^T,  g_t = mu (1 - mu^(t+1)) / (1 - mu)
            P_t = mu^(t+1) P0 - s sum_{j<=t} mu^(t-j) phi(k_j) v_j^T
        (for linear attention g = 0 and w = 1)."""
        c, mu, s = q.shape[2], self.mu, self.stepsize
        t = torch.arange(c, device=q.device)
        distance = (t[:, None] - t[None, :]).float()  # (c, c): query t, key j
        causal = distance >= 0
        weights = torch.where(causal, key_weights(distance.clamp(min=0), mu, s), 0.0)
        scores = q @ k.transpose(-1, -2)  # (B, nh, c, c)
        S0, z0 = state["S"], state["z"]
        numerator = (scores * weights) @ v + q @ S0
        denominator = (scores * causal).sum(-1, keepdim=True) + q @ z0[..., None]
        kv_last = weights[-1, :, None] * k  # (B, nh, c, hs): keys as weighted at the last query
        new_S = S0 + kv_last.transpose(-1, -2) @ v
        if self.momentum:
            P0 = state["P"]
            gain = mu * (1 - mu ** (t.float() + 1)) / (1 - mu)  # g_t, (c,)
            numerator = numerator - gain[:, None] * (q @ P0)
            new_S = new_S - gain[-1] * P0
            decay = mu ** (c - 1 - t.float())  # mu^(c-1-j): key j's decay at the chunk's end
            state["P"] = mu ** c * P0 - s * (decay[:, None] * k).transpose(-1, -2) @ v
        state["S"] = new_S
        state["z"] = z0 + k.sum(2)
        return numerator / (denominator + EPS)
