"""Linear attention kinds for the GPT (`--attention linear | momentum | adaptive_momentum`):
causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") and the momentum
recurrences of the Momentum Transformer (Nguyen et al. 2022), each trained in a parallel form
and sampled in a recurrent form. (The paper's other momentum, across layers in the residual
connection, is transformer/block.py's MomentumBlock.)

Queries and keys go through the feature map phi(x) = elu(x) + 1, which is positive, so the
normaliser below is positive. Query i reads

    y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),      z_i = sum_{j<=i} phi(k_j)

with the (head_dim x head_dim) matrix S_i built by a recurrence over the keys and values,
U_i = phi(k_i) v_i^T:

    linear:             S_i = S_{i-1} + U_i
    momentum:           P_i = mu P_{i-1} - s U_i,      S_i = S_{i-1} - P_i
    adaptive_momentum:  P_i = mu_i P_{i-1} - s U_i,    S_i = S_{i-1} - P_i, with
                        mu_i = clip((1 - sqrt(|U_i - U_{i-1}|_F / |U_{i-1}|_F))^2, 0, 1 - delta)

Unrolled, each weighs key j at query i:

    S_i = sum_{j<=i} w_ij U_j,    w_ij = s (1 + mu_{j+1} + mu_{j+1} mu_{j+2} + ... + mu_{j+1}..mu_i)

which for a constant mu is a function of the distance alone, w(d) = s (1 - mu^(d+1)) / (1 - mu)
(linear attention is mu = 0, s = 1: w = 1). The weight ends at the *query*, and the parallel
form computes exactly that at every position, so training fits the function that the recurrent
sampler evaluates. (Weighting keys up to the end of the sequence instead, as a parallel form
written for whole sequences may, trains one model and samples another.)

Where the equations come from: the authors' public code (github.com/minhtannguyen/momentum-
transformer-code-submission, the code behind the seed's `--mu --stepsize --delta` flags); the
paper's text itself was not available to check its equation numbers against.
- `momentum` is the seed's `causal-momentum` (fast_transformers/attention/
  causal_momentum_attention.py, recurrent/attention/self_attention/momentum_attention.py): the
  paper's momentum on linear attention's state, S as the iterate and -U_i as the gradient step.
- `adaptive_momentum` is the seed's `causal-ncmomentum` (causal_ncmomentum_attention.py): the
  paper's adaptive momentum, the heavy-ball momentum that is optimal on a quadratic,
  (1 - sqrt(.))^2, with the curvature estimated from how much U changed between neighbouring
  positions; the seed's `--delta` keeps mu_i <= 1 - delta. mu_i is computed per head; at the
  first position there is no U_{i-1} and no P_{i-1} to carry, so mu_0 does not matter.
  Deviations: the seed's parallel form weighs key j by the product of the mu's up to the *end
  of the sequence* (so a position's output depends on the tokens after it, through their mu's)
  and it has no recurrent form; here the weights stop at the query, as the recurrence does, and
  the recurrent form is the sampler. |U_i - U_{i-1}|_F and |U_{i-1}|_F are computed from dot
  products (U is rank one: |a b^T - c d^T|_F^2 = |a|^2|b|^2 + |c|^2|d|^2 - 2 (a.c)(b.d)), with
  1e-12 added to both sides of the ratio so that it and its gradient stay finite.
- `--delta` is not the delta rule (Schlag et al. 2021): in the seed it is only this margin.

The normaliser z: momentum acts on S only; z stays linear attention's running sum of phi(k).
Were z given the same momentum, s would cancel between numerator and denominator and
`--stepsize` would do nothing. So w lies in [s, s / (1 - mu)] (adaptive: [s, s / delta], and
at most s (i - j + 1)): each output is a positively weighted average of the values, scaled by at
most that bound, at any sequence length.

Parallel form (training, and a prompt given at once): chunks of CHUNK positions. Inside a chunk
the (c x c) matrix of w_ij phi(q_i)^T phi(k_j), across chunks the state carried from the chunk
before — exact, in O(T c d + T d^2) time and memory linear in T. For adaptive momentum the
(c x c) products mu_{j+1}..mu_t come from a cumulative product down the columns of a matrix of
mu's, so no division by a product that may underflow. Recurrent form (sampling): the literal
recurrence above, one token per step, on a state of fixed size — per layer and head S (d x d), z
(d), with momentum P (d x d), with adaptive momentum also the last phi(k) and v (d each) that
U_{i-1} is made of; all fp32 — so a step costs the same at token 10 and token 3,000.

No attention dropout: there is no attention matrix in the recurrent form to drop from; the
output projection's dropout still applies.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from priors.dropout import Dropout

CHUNK = 64   # positions per chunk of the parallel form
EPS = 1e-6   # keeps the normaliser away from zero when every phi(q)^T phi(k) underflows
TINY = 1e-12  # keeps adaptive momentum's ratio of norms (and its gradient) finite
MOMENTUM_KINDS = ("momentum", "adaptive_momentum")  # the kinds with a P state


# helpers

def feature_map(x):
    """phi(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1


def key_weights(distance, mu, stepsize):
    """w(d) = s (1 - mu^(d+1)) / (1 - mu): the weight of a key d positions before the query."""
    return stepsize * (1 - mu ** (distance + 1)) / (1 - mu)


def adaptive_momentum(k, v, k_before, v_before, delta):
    """mu_i = clip((1 - sqrt(|U_i - U_{i-1}|_F / |U_{i-1}|_F))^2, 0, 1 - delta) for U = phi(k) v^T,
    from features k and values v (..., hs) at i and at i - 1 -> (...,)."""
    def dot(a, b):
        return (a * b).sum(-1)
    before = dot(k_before, k_before) * dot(v_before, v_before)  # |U_{i-1}|^2
    change = (dot(k, k) * dot(v, v) + before
              - 2 * dot(k, k_before) * dot(v, v_before)).clamp(min=0)  # |U_i - U_{i-1}|^2
    ratio = ((change + TINY) / (before + TINY)) ** 0.25  # the square root of the norms' ratio
    return ((1 - ratio) ** 2).clamp(0, 1 - delta)


def adaptive_coefficients(mu, stepsize):
    """mu (B, nh, c), mu_t linking position t of a chunk to the one before it (mu_0 to the last
    position of the chunk before) -> the chunk's coefficients, as the constant-mu closed forms:
        weights (B, nh, c, c)  w_tj = s sum_{r=j..t} D_rj, D_rj = mu_{j+1}..mu_r (1 if r = j)
        gain (B, nh, c)        sum_{r<=t} mu_0..mu_r: how much of P0 position t's S loses
        decay (B, nh, c)       D_{c-1, j}: key j's share of P at the chunk's end
        carry (B, nh, 1, 1)    mu_0..mu_{c-1}: P0's share of P at the chunk's end"""
    c = mu.shape[-1]
    below = torch.ones(c, c, dtype=torch.bool, device=mu.device).tril(-1)  # row r > column j
    # down column j: 1 on and above the diagonal, mu_r below, so the running product at row r
    # is mu_{j+1}..mu_r; above the diagonal (r < j) it is not a weight and is zeroed
    D = torch.where(below, mu[..., :, None], 1.0).cumprod(-2).tril()
    decay_from_start = mu.cumprod(-1)  # mu_0..mu_t
    return (stepsize * D.cumsum(-2), decay_from_start.cumsum(-1), D[..., -1, :],
            decay_from_start[..., -1, None, None])


class RecurrentState:
    """The sampler's memory for linear attention, fixed in size whatever the position:
    S (n_layer, B, nh, hs, hs), z (n_layer, B, nh, hs), with momentum P like S, with adaptive
    momentum k_last and v_last like z (the last position's phi(k) and v); fp32."""

    def __init__(self, config, batch_size, device):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, head_dim)
        self.S = torch.zeros(*shape, head_dim, device=device)
        self.z = torch.zeros(shape, device=device)
        self.P = torch.zeros_like(self.S) if config.attention in MOMENTUM_KINDS else None
        adaptive = config.attention == "adaptive_momentum"
        self.k_last = torch.zeros(shape, device=device) if adaptive else None
        self.v_last = torch.zeros(shape, device=device) if adaptive else None

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size()
                   for t in (self.S, self.z, self.P, self.k_last, self.v_last) if t is not None)


# main class

class LinearAttention(nn.Module):
    """Causal linear attention; with config.attention == "momentum", the momentum recurrence
    (mu = config.mu, s = config.stepsize); with "adaptive_momentum", mu_i computed at every
    position (s = config.stepsize, mu_i <= 1 - config.delta). Same parameters as softmax
    attention (qkv, proj)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.momentum = config.attention in MOMENTUM_KINDS
        self.adaptive = config.attention == "adaptive_momentum"
        self.mu, self.stepsize = (config.mu, config.stepsize) if self.momentum else (0.0, 1.0)
        self.delta = config.delta if self.adaptive else None  # mu_i <= 1 - delta
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
            if self.adaptive:
                k_last, v_last = cache.k_last[layer], cache.v_last[layer]
                mu = adaptive_momentum(k[:, :, 0], v[:, :, 0], k_last, v_last, self.delta)
                P.mul_(mu[..., None, None]).sub_(kv, alpha=self.stepsize)
                k_last.copy_(k[:, :, 0])
                v_last.copy_(v[:, :, 0])
            else:
                P.mul_(self.mu).sub_(kv, alpha=self.stepsize)  # P_i = mu P_{i-1} - s U_i
            S.sub_(P)                                          # S_i = S_{i-1} - P_i
        else:
            S.add_(kv)
        z.add_(k[:, :, 0])
        return (q @ S) / (q @ z[..., None] + EPS)  # (B, nh, 1, hs)

    # the parallel form: chunks, each starting from the state the chunk before left

    def _state_of(self, cache, layer, batch, like):
        names = ["S", "z"] + ["P"] * self.momentum + ["k_last", "v_last"] * self.adaptive
        if cache is not None:
            return {name: getattr(cache, name)[layer] for name in names}
        head_dim = like.shape[-1]
        shapes = {"S": (head_dim, head_dim), "P": (head_dim, head_dim)}
        return {name: like.new_zeros(batch, self.n_head, *shapes.get(name, (head_dim,)))
                for name in names}

    def _chunks(self, q, k, v, state):
        """q, k (features), v: (B, nh, T, hs); `state` (S, z[, P][, k_last, v_last]) before
        position 0, updated to the state after position T-1. Returns (B, nh, T, hs)."""
        # split, not slices: a slice's backward writes into a zero tensor of the whole input
        chunks = zip(*(t.split(CHUNK, dim=2) for t in (q, k, v)))
        return torch.cat([self._chunk(*chunk, state) for chunk in chunks], 2)

    def _chunk(self, q, k, v, state):
        """One chunk of c positions t = 0..c-1 from the state (S0, z0, P0) before it. Unrolling
        the recurrence inside the chunk:
            S_t = S0 - g_t P0 + sum_{j<=t} w_tj phi(k_j) v_j^T
            P_t = G_t P0 - s sum_{j<=t} D_tj phi(k_j) v_j^T
        with D_tj = mu_{j+1}..mu_t, G_t = mu_0..mu_t, g_t = G_0 + .. + G_t; for a constant mu,
        w_tj = w(t - j), g_t = mu (1 - mu^(t+1)) / (1 - mu) (for linear attention g = 0, w = 1)."""
        c, mu, s = q.shape[2], self.mu, self.stepsize
        t = torch.arange(c, device=q.device)
        distance = (t[:, None] - t[None, :]).float()  # (c, c): query t, key j
        causal = distance >= 0
        if self.adaptive:
            # mu_t from position t - 1: the chunk before's last, then this chunk's own
            k_before = torch.cat([state["k_last"][:, :, None], k[:, :, :-1]], 2)
            v_before = torch.cat([state["v_last"][:, :, None], v[:, :, :-1]], 2)
            mus = adaptive_momentum(k, v, k_before, v_before, self.delta)  # (B, nh, c)
            weights, gain, decay, carry = adaptive_coefficients(mus, s)
            state["k_last"], state["v_last"] = k[:, :, -1], v[:, :, -1]
        else:
            weights = torch.where(causal, key_weights(distance.clamp(min=0), mu, s), 0.0)
        scores = q @ k.transpose(-1, -2)  # (B, nh, c, c)
        S0, z0 = state["S"], state["z"]
        numerator = (scores * weights) @ v + q @ S0
        denominator = (scores * causal).sum(-1, keepdim=True) + q @ z0[..., None]
        kv_last = weights[..., -1, :, None] * k  # (B, nh, c, hs): keys as the last query sees them
        new_S = S0 + kv_last.transpose(-1, -2) @ v
        if self.momentum:
            if not self.adaptive:
                gain = mu * (1 - mu ** (t.float() + 1)) / (1 - mu)  # g_t, (c,)
                decay = mu ** (c - 1 - t.float())  # mu^(c-1-j): key j's decay at the chunk's end
                carry = mu ** c
            P0 = state["P"]
            numerator = numerator - gain[..., :, None] * (q @ P0)
            new_S = new_S - gain[..., -1, None, None] * P0
            state["P"] = carry * P0 - s * (decay[..., None] * k).transpose(-1, -2) @ v
        state["S"] = new_S
        state["z"] = z0 + k.sum(2)
        return numerator / (denominator + EPS)
