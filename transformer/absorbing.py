"""Absorbing-state discrete diffusion over a token grid (the `absorbing` prior; Bond-Taylor et
al. 2022, "Unleashing Transformers"), with MaskGIT confidence decoding (Chang et al. 2022) as a
second sampler.

The forward process. At time t in 1..T (T = `timesteps`, by default the number of tokens D) each
token of the grid is replaced, independently, by the mask token (id = vocab_size) with
probability t/T; at t = T everything is masked. A bidirectional transformer reads the partly
masked grid (plus the class label, added to every position) and predicts every token's value.

The bound. Going back from t to t-1, the true reverse step reveals each still-masked token with
probability (1/T) / (t/T) = 1/t, to its real value. Our model reveals with the same probability,
to a value drawn from p(x0_i | x_t). Per masked token the KL between the two steps is then
(1/t) log(1 / p(x0_i | x_t)); at t = 1 it is the whole -log p of what is still masked; x_T (all
masked) costs nothing. Summing over the steps,

    -log p(x0) <= sum_{t=1..T} E_{x_t ~ q(x_t | x0)} [ (1/t) sum_{i masked} -log p(x0_i | x_t) ]
               =  E_{t ~ U{1..T}} E_{x_t} [ (T/t) sum_{i masked} -log p(x0_i | x_t) ].

`nll` returns the one-draw estimate of the second line per image, drawing t and the mask from
its `generator` (a fixed seed makes evaluations comparable).

Training losses (`--loss`), with CE_i = -log p(x0_i | x_t) summed over the masked tokens only:
    elbo             (T/t) * sum CE_i / D         an unbiased estimate of the bound per token;
                                                  noisy, since small t gives few, heavily
                                                  weighted tokens
    reweighted_elbo  (1 - (t-1)/T) * sum CE_i / D  (the default) the weighting of Unleashing
                                                  Transformers, shifted by one step so that the
                                                  fully masked grid (t = T), where every sampler
                                                  starts, keeps the weight 1/T instead of 0
    mlm              sum CE_i / max(1, #masked)   the mean over masked tokens (BERT, MaskGIT)
The bound itself is always the validation metric (`val/bits_per_dim`), whatever the loss.

Training times and masks (Unleashing Transformers' code: `sample_time` and `q_sample_mlm` in its
models/absorbing_diffusion.py):
    --time_sampling uniform     (the default) t ~ U{1..T}
    --time_sampling importance  t ~ p(t) proportional to sqrt(E[L_t^2]) + 1e-4, L_t an image's
                loss at time t (in the chosen weighting), E[L_t^2] an exponential average
                (0.9 old, 0.1 new; its first draw sets it) kept per t in the model's buffers,
                so checkpoints and resumes carry it; uniform until every t was drawn 10 times.
                Each image's loss is multiplied by 1 / (T p(t)): E_p[L_t / (T p(t))] =
                E_U[L_t], the same objective with less variance (the importance sampling of
                Nichol & Dhariwal 2021, "Improved DDPM", Sec. 3.3). Only while training: in
                eval mode forward() draws t uniformly and records nothing.
    --mask_schedule random      (the default) each token masked with probability t/T
    --mask_schedule fixed       exactly round(D t/T) tokens masked, at least one, at uniformly
                random positions: the masked share no longer scatters around t/T. The losses
                keep their weights, so `elbo` is then only close to the bound; `nll` (and so
                validation) always uses random masks and uniform t.

Strides (`--stride`, the `sample_stride` of Unleashing Transformers' code): the times
t_1 > t_2 > ... > t_K > 0 at which a sampler calls the network, K calls in all, for n tokens to
draw (the grid's D, or the most any image of a completion leaves masked) and S = --steps:
    magic      S, S-1, ..., 1 (the absorbing sampler's default; S unset: n)
    all        n, n-1, ..., 1: one token per call (no --steps)
    even       floor of S points evenly spaced from 1 to n (the code's linspace(1, T, S))
    quadratic  S^2, (S-1)^2, ..., 1 (S unset: isqrt(n); the code's squares x^2 for x < sqrt(T))
    cosine     cos(pi/2 (i-1)/S) for i = 1..S: MaskGIT's schedule (the maskgit sampler's default)
    LIST       "1,2,4,9": how many tokens each call reveals on a fresh grid, summing to its D
               tokens (sample() checks); its times are the counts still masked before each call
The grid is wholly masked at t_1, and going from t_i to t_(i+1) (0 after the last call) each
masked token is revealed with probability (t_i - t_(i+1)) / t_i: in the forward process a token
masked at time t is still masked at s < t with probability s/t, so this is the exact reverse
step over any gap. (The seed's code reveals 1/t_i at each listed time whatever the gap; the two
agree where the gaps are 1, magic and all.) A fresh grid keeps about n t_(i+1) / t_1 tokens
masked after call i: about n/S per call for magic and even, n (2x - 1) / S^2 for quadratic at
x = S..1 (most first, one at the end), few first and most last for cosine.

Sampling (`sample(..., sampler=, stride=, steps=S)`), both samplers in K network evaluations;
maskgit (with its cosine stride) is the default: on the demo digits at 8 steps its samples'
classifier confidence and precision are within 10% of a GPT's on the same codes, conditional or
not, where the reverse process's unconditional precision is about 30% below the GPT's;
maskgit pays in recall (docs/absorbing.md, "Labels and 8 steps", chosen on a validation split):
    absorbing  the reverse process at the stride's times: from t_i to t_(i+1) we reveal a
               uniformly random subset of each image's m masked positions whose size is
               floor or ceil of m (t_i - t_(i+1)) / t_i, with that mean (randomised rounding):
               each position's probability is exactly (t_i - t_(i+1)) / t_i. An image with more
               masked tokens than calls left reveals at least one and keeps one for each later
               call, so a fresh grid takes exactly K calls; the last call reveals the rest. With
               magic this is t = S..1 revealing m/t, which never needs that clamp. Revealed
               values are drawn from the (guided, filtered) prediction.
    maskgit    confidence decoding: at step i = 1..K draw a value for every masked position;
               `temperature` divides the logits these values are drawn from (as for every
               prior). Each drawn value's confidence is its log-probability under that same
               distribution, plus Gumbel noise of scale choice_temperature * (1 - i/K) (annealed
               linearly to 0 at the last step). The floor(m0 t_(i+1) / t_1) least confident
               positions are masked again (m0: the masked count at the start; cosine:
               floor(m0 cos(pi/2 i/K))), at most m - 1 of the m masked now and, in an image
               with m0 >= K, at least one for each later step, so every step reveals at least
               one token and the last reveals all.
When completion leaves an image fewer masked tokens than calls, the batch runs the stride for
the largest masked count (so at most that many calls); an image with fewer masked tokens than
that simply has steps in which none of its tokens is revealed (the absorbing rule then skips the
network evaluation when no image of the batch reveals anything).

Larger grids (`grid_h`, `grid_w` at sampling, >= the trained grid): the network only knows the
trained h x w positions, so each step runs it on windows of the trained size (starts at a stride
of half the window, the last one flush with the edge, all windows in one batch), and each
position takes its prediction from the window whose centre is nearest to it (in pixels, so the R,
G and B of one pixel share a window).
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from core.config import field
from core.errors import UserError
from priors.base import Prior, PriorConfig
from priors.dropout import Dropout
from priors.sampling import filter_logits, guided, multinomial, rand
from priors.settings import SamplingConfig, setting_name
from transformer.block import Block, SelfAttention
from transformer.init import init_gpt2

LOSSES = ("elbo", "reweighted_elbo", "mlm")
SAMPLERS = ("absorbing", "maskgit")
STRIDES = ("magic", "all", "even", "quadratic", "cosine")  # or a list of tokens per call
MASK_SCHEDULES = ("random", "fixed")
TIME_SAMPLINGS = ("uniform", "importance")
IMPORTANCE_WARMUP = 10  # draws of every t before importance sampling starts (the seed's)


@dataclass
class AbsorbingConfig(PriorConfig):
    n_layer: int = field(4, "transformer blocks")
    n_head: int = field(4, "attention heads")
    n_embd: int = field(128, "width of the transformer")
    dropout: float = field(0.1, "dropout in the blocks")
    timesteps: Optional[int] = field(None, "diffusion steps T (default: the number of tokens)")
    loss: str = field("reweighted_elbo", "training loss weighting: " + ", ".join(LOSSES) +
                      " (see transformer/absorbing.py)")
    mask_schedule: str = field("random", "which tokens training masks at time t: random (each "
                                         "with probability t/T) or fixed (exactly round(t/T x "
                                         "tokens), at least one)")
    time_sampling: str = field("uniform", "training times t: uniform, or importance (drawn in "
                                          "proportion to the root mean square of their loss, "
                                          "each loss reweighted by 1/(T p(t)) so the objective "
                                          "stays the same)")

    @property
    def steps(self):
        """T, the number of diffusion steps."""
        return self.timesteps or self.block_size

    def validate(self):
        super().validate()
        if self.head != "softmax":
            raise UserError(f"the absorbing prior has a softmax head only, got --head {self.head}")
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd {self.n_embd} is not divisible by --n_head {self.n_head}")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.timesteps is not None and self.timesteps < 1:
            raise UserError(f"--timesteps must be at least 1, got {self.timesteps}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise UserError(f"--mask_schedule must be one of {', '.join(MASK_SCHEDULES)}, got "
                            f"'{self.mask_schedule}'")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise UserError(f"--time_sampling must be one of {', '.join(TIME_SAMPLINGS)}, got "
                            f"'{self.time_sampling}'")


# helpers

def _uniform(shape, generator, device, per_row=None):
    return rand(shape, generator, device, per_row)  # generator: also RowGenerators


def reveal_subset(masked, t, generator=None, later=None, calls_after=None):
    """(B, L) bool masked positions at time t -> (B, L) bool, a uniformly random subset of each
    row's m masked positions revealed on the way to time `later` (default t - 1; 0 = the last
    call, which reveals them all): of size floor or ceil of m (t - later) / t, with that mean,
    so each masked position is chosen with probability exactly (t - later) / t (at t - 1: 1/t,
    and at least one when m >= t). With `calls_after` (the calls still to come), a row with more
    masked positions than that reveals at least one and keeps one for each later call."""
    device = masked.device
    later = t - 1 if later is None else later
    remaining = masked.sum(1)  # (B,)
    expected = remaining * (t - later) / t  # (B,); at t - 1 exactly m/t
    count = expected.floor() + (_uniform(expected.shape, generator, device) < expected.frac())
    if later == 0:
        count = remaining.to(count.dtype)  # (m t / t may round below m)
    elif calls_after is not None:
        spare = remaining > calls_after
        count = torch.where(spare, count.clamp(min=1), count)
        count = torch.where(spare, torch.minimum(count, remaining - calls_after), count)
    scores = _uniform(masked.shape, generator, device).masked_fill(~masked, 2.0)
    rank = scores.argsort(1).argsort(1)  # the masked positions take ranks 0..m-1, in random order
    return rank < count[:, None]


def stride_counts(stride):
    """A list stride "1,2,4,9" -> [1, 2, 4, 9] (tokens each call reveals); None for a named
    stride or anything else (AbsorbingSampling.validate refuses what is neither)."""
    if not isinstance(stride, str) or stride in STRIDES:
        return None
    try:
        counts = [int(part) for part in stride.split(",")]
    except ValueError:
        return None
    return counts if all(c >= 1 for c in counts) else None


def stride_times(stride, steps, tokens):
    """The times t_1 > ... > t_K > 0 of a stride's K network calls (module docstring, Strides;
    Unleashing Transformers' `sample_stride`), for `tokens` tokens to draw and --steps `steps`
    (None: the stride's default; more than `tokens` is cut to `tokens`). [] when there is
    nothing to draw."""
    if tokens == 0:
        return []
    counts = stride_counts(stride)
    if counts is not None:  # the times are the counts still masked before each call
        return [sum(counts[i:]) for i in range(len(counts))]
    if stride == "all":
        return list(range(tokens, 0, -1))
    if steps is None:
        steps = math.isqrt(tokens) if stride == "quadratic" else tokens
    steps = min(steps, tokens)
    if stride == "magic":
        return list(range(steps, 0, -1))
    if stride == "even":  # floor(linspace(1, n, S)), descending: distinct, as S <= n
        return [1 + (tokens - 1) * i // (steps - 1) for i in range(steps - 1, -1, -1)] \
            if steps > 1 else [1]
    if stride == "quadratic":
        return [x * x for x in range(steps, 0, -1)]
    if stride == "cosine":
        return [math.cos(math.pi / 2 * i / steps) for i in range(steps)]
    raise ValueError(f"unknown stride {stride!r}")


def window_starts(size, window, unit=1):
    """Start offsets of windows of `window` cells covering `size` cells, at a stride of about
    half a window (a multiple of `unit`), the last one flush with the end."""
    stride = max(unit, window // 2 // unit * unit)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def nearest_window(size, window, starts, unit=1):
    """(size,) index into `starts` of the window whose centre is nearest each cell, comparing
    whole pixels of `unit` cells (ties: the earlier window)."""
    pixel = torch.arange(size) // unit
    centres = (torch.tensor(starts) // unit) + (window // unit - 1) / 2
    return (pixel[:, None] - centres[None, :]).abs().argmin(1)


# main classes

class Absorbing(Prior):
    family = "absorbing"
    nll_is_bound = True

    def __init__(self, config):
        super().__init__(config)
        self.mask_token = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size + 1, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.label_embedding = self.make_label_embedding(config.n_embd)
        self.dropout = Dropout(config.dropout)
        # bidirectional: every position reads every position, the mask token included
        self.blocks = nn.ModuleList(Block(config, SelfAttention(config, causal=False))
                                    for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head_proj = nn.Linear(config.n_embd, self.head.out_dim, bias=False)
        init_gpt2(self, config.n_layer)
        if config.time_sampling == "importance":
            # per t in 0..T (0 unused): the average squared loss and how often t was drawn; as
            # buffers they are in every checkpoint, so a resumed training goes on with them
            self.register_buffer("loss_sq_history", torch.zeros(config.steps + 1))
            self.register_buffer("loss_count", torch.zeros(config.steps + 1))

    # the network

    def _hidden(self, tokens, labels=None, hidden=None):
        """tokens (B, L) over the trained grid, mask token included -> (B, L, n_embd). With a
        list `hidden`, append the residual stream at the input and after each block."""
        x = self.token_embedding(tokens) + self.position_embedding.weight
        if labels is not None:
            x = x + self.label_embedding(labels)[:, None]
        x = self.dropout(x)
        if hidden is not None:
            hidden.append(x)
        for block in self.blocks:
            x = block(x)
            if hidden is not None:
                hidden.append(x)
        return x

    def hidden_states(self, tokens, labels=None):
        """tokens (B, h, w) -> [(B, T, n_embd)] * (n_layer + 1): the residual stream at the
        input and after each block with no token masked (the null label for a conditional
        prior when none is given). Image GPT's probes pool these."""
        codes = tokens.reshape(tokens.shape[0], -1)
        hidden = []
        self._hidden(codes, self.labels_for(codes.shape[0], labels, codes.device), hidden)
        return hidden

    def _logits(self, hidden):
        return self.head_proj(self.ln_f(hidden))

    def corrupt(self, tokens, generator=None, t=None, schedule="random"):
        """(B, L) tokens -> t (B,) in 1..T (uniform, unless given) and the masked positions
        (B, L) bool: each token masked with probability t/T (`random`), or exactly round(L t/T)
        of them, at least one, at uniformly random positions (`fixed`, the seed's
        `q_sample_mlm`)."""
        steps, device = self.config.steps, tokens.device
        if t is None:
            t = torch.randint(1, steps + 1, (tokens.shape[0],), generator=generator,
                              device=device)
        if schedule == "fixed":
            count = (t * tokens.shape[1] / steps).round().clamp(min=1)  # (B,)
            rank = _uniform(tokens.shape, generator, device).argsort(1).argsort(1)
            return t, rank < count[:, None]
        masked = _uniform(tokens.shape, generator, device) < (t / steps)[:, None]
        return t, masked

    def training_times(self, batch, device):
        """forward()'s times: t (batch,) in 1..T, and each image's loss weight 1 / (T p(t)),
        or None for uniform times (module docstring, --time_sampling)."""
        steps = self.config.steps
        if self.importance_ready():
            p = self.time_probabilities()  # (T,) for t = 1..T
            t = torch.multinomial(p, batch, replacement=True) + 1
            return t.to(device), (1 / (steps * p[t - 1])).to(device)
        return torch.randint(1, steps + 1, (batch,), device=device), None

    def importance_ready(self):
        """Importance sampling is on, training, and past its warm-up."""
        return (self.config.time_sampling == "importance" and self.training
                and bool((self.loss_count[1:] >= IMPORTANCE_WARMUP).all()))

    def time_probabilities(self):
        """(T,) p(t) for t = 1..T, proportional to sqrt(E[L_t^2]) + 1e-4 (the seed's floor: no
        time is left out)."""
        root = self.loss_sq_history[1:].sqrt() + 1e-4
        return root / root.sum()

    @torch.no_grad()
    def _record_losses(self, t, losses):
        """Fold each image's loss (B,) at its time t (B,) into the history: for every t drawn,
        the mean of its squared losses in this batch enters the exponential average (or sets
        it, the first time), and its draws are counted."""
        sums = torch.zeros_like(self.loss_sq_history).index_add_(0, t, losses.float() ** 2)
        draws = torch.zeros_like(self.loss_count).index_add_(
            0, t, torch.ones_like(losses, dtype=self.loss_count.dtype))
        seen = draws > 0
        mean = sums[seen] / draws[seen]
        first = self.loss_count[seen] == 0
        self.loss_sq_history[seen] = torch.where(first, mean,
                                                 0.9 * self.loss_sq_history[seen] + 0.1 * mean)
        self.loss_count += draws

    def _masked_ce(self, tokens, labels, t, masked):
        """-log p(x0_i | x_t) (B, L) at the masked positions (0 elsewhere), and the logits."""
        out = self._logits(self._hidden(tokens.masked_fill(masked, self.mask_token), labels))
        ce = self.head.nll(out, tokens[..., None]) * masked
        return ce, out

    # the interface (priors/base.py)

    def forward(self, tokens, labels=None):
        """tokens (B, h, w) -> head outputs (B, L, vocab) on a randomly masked copy, and the
        training loss (see the module docstring for the weightings), in nats per token."""
        codes = tokens.reshape(tokens.shape[0], -1)
        labels = self.training_labels(labels, codes.shape[0], codes.device)
        t, weight = self.training_times(codes.shape[0], codes.device)
        t, masked = self.corrupt(codes, t=t, schedule=self.config.mask_schedule)
        ce, out = self._masked_ce(codes, labels, t, masked)
        total, steps, length = ce.sum(1), self.config.steps, codes.shape[1]
        # each image's loss (B,), and what turns the batch mean into nats per token
        if self.config.loss == "elbo":
            losses, per = steps / t * total, length
        elif self.config.loss == "reweighted_elbo":
            losses, per = (1 - (t - 1) / steps) * total, length
        else:  # mlm
            losses, per = total / masked.sum(1).clamp(min=1), 1
        if self.config.time_sampling == "importance" and self.training:
            self._record_losses(t, losses.detach() / per)
        if weight is not None:
            losses = losses * weight
        return out, losses.mean() / per

    def nll(self, tokens, labels=None, generator=None):
        """(N,) one-draw Monte-Carlo estimates of the ELBO, in nats per image (an upper bound
        on -log p in expectation)."""
        codes = tokens.reshape(tokens.shape[0], -1)
        labels = self.labels_for(codes.shape[0], labels, codes.device)
        t, masked = self.corrupt(codes, generator)
        ce, _ = self._masked_ce(codes, labels, t, masked)
        return self.config.steps / t * ce.sum(1)

    @torch.no_grad()
    def sample(self, n, labels=None, known=None, known_mask=None, temperature=1.0, top_k=None,
               top_p=None, steps=None, guidance=None, generator=None, sampler=None,
               choice_temperature=None, grid_h=None, grid_w=None, on_step=None, stride=None,
               on_progress=None, **options):
        """(n, grid_h, grid_w) tokens in the stride's network evaluations (module docstring);
        the settings are AbsorbingSampling's; on_step and on_progress as in priors/base.py."""
        s = self.sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                                   steps=steps, guidance=guidance, sampler=sampler,
                                   choice_temperature=choice_temperature, grid_h=grid_h,
                                   grid_w=grid_w, stride=stride, **options)
        self.check_sample_args(s.guidance, labels)
        sampler = s.sampler
        height, width = self._sample_grid(s.grid_h, s.grid_w)
        length = height * width
        if s.steps is not None and not 1 <= s.steps <= length:
            raise UserError(f"--steps must be in 1..{length} (the tokens of a {height}x{width} "
                            f"grid), got {s.steps}")
        stride = s.stride or ("magic" if sampler == "absorbing" else "cosine")
        counts = stride_counts(stride)
        if counts is not None and sum(counts) != length:
            raise UserError(f"--stride {stride} reveals {sum(counts)} tokens, but a "
                            f"{height}x{width} grid has {length}: a list gives how many tokens "
                            f"each network call reveals")
        device = self.position_embedding.weight.device
        tokens = torch.full((n, length), self.mask_token, dtype=torch.long, device=device)
        if known is not None:
            if known.shape != (n, height, width) or known_mask.shape != known.shape:
                raise ValueError(f"known and known_mask must be ({n}, {height}, {width})")
            tokens = torch.where(known_mask.to(device).reshape(n, length),
                                 known.to(device).reshape(n, length), tokens)
        predict = Predictor(self, n, (height, width), labels, s.guidance, s.temperature, s.top_k,
                            s.top_p, device)
        times = stride_times(stride, s.steps, int((tokens == self.mask_token).sum(1).max()))
        report = None
        if on_step is not None:  # the decoders' rows (n, L) as grids
            report = lambda t, decided: on_step(t.view(n, height, width),
                                                decided.view(n, height, width))
        if sampler == "absorbing":
            tokens = absorbing_decode(predict, tokens, self.mask_token, times, generator,
                                      on_step=report, on_progress=on_progress)
        else:
            choice = 4.5 if s.choice_temperature is None else s.choice_temperature
            tokens = maskgit_decode(predict, tokens, self.mask_token, times, choice, generator,
                                    on_step=report, on_progress=on_progress)
        return tokens.view(n, height, width)

    def _sample_grid(self, grid_h, grid_w):
        config = self.config
        height, width = grid_h or config.grid_h, grid_w or config.grid_w
        if height < config.grid_h or width < config.grid_w:
            raise UserError(f"--grid_h/--grid_w must be at least the trained grid "
                            f"({config.grid_h}x{config.grid_w}), got {height}x{width}")
        if width % config.channels:
            raise UserError(f"--grid_w {width} is not a multiple of {config.channels} values "
                            f"per pixel")
        return height, width


class Predictor:
    """What both samplers ask at each step: the distribution of the tokens at some positions
    given the current grid, with classifier-free guidance, temperature and top-k/top-p applied.
    Runs the network once per call (on a doubled batch with guidance; on windows of the trained
    size for a larger grid)."""

    def __init__(self, model, n, grid, labels, guidance, temperature, top_k, top_p, device):
        self.model, self.grid = model, grid
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.guidance = guidance if guidance is not None and guidance != 1 else None
        labels = model.labels_for(n, labels, device)
        if self.guidance is not None:  # the labels, then the null label
            labels = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
        self.labels = labels
        config = model.config
        if grid != (config.grid_h, config.grid_w):
            self._plan_windows(config, *grid)

    def _plan_windows(self, config, height, width):
        rows = window_starts(height, config.grid_h)
        cols = window_starts(width, config.grid_w, config.channels)
        self.windows = [(r, c) for r in rows for c in cols]
        owner_row = nearest_window(height, config.grid_h, rows)
        owner_col = nearest_window(width, config.grid_w, cols, config.channels)
        row_start, col_start = torch.tensor(rows)[owner_row], torch.tensor(cols)[owner_col]
        # for every position of the large grid: its window and its index inside that window
        self.owner = (owner_row[:, None] * len(cols) + owner_col[None, :]).flatten()
        local_row = torch.arange(height) - row_start
        local_col = torch.arange(width) - col_start
        self.local = (local_row[:, None] * config.grid_w + local_col[None, :]).flatten()

    def _hidden(self, tokens):
        """tokens (B, L) -> final hidden states (B, L, n_embd)."""
        model, config = self.model, self.model.config
        if self.grid == (config.grid_h, config.grid_w):
            return model._hidden(tokens, self.labels)
        b, (h, w) = tokens.shape[0], (config.grid_h, config.grid_w)
        grid = tokens.view(b, *self.grid)
        crops = torch.stack([grid[:, r:r + h, c:c + w] for r, c in self.windows], 1)  # (B, nw, h, w)
        labels = (self.labels.repeat_interleave(len(self.windows))
                  if self.labels is not None else None)
        hidden = model._hidden(crops.view(-1, h * w), labels).view(b, len(self.windows), h * w, -1)
        owner, local = self.owner.to(tokens.device), self.local.to(tokens.device)
        return hidden[:, owner, local]  # (B, L, n_embd)

    def log_probs(self, tokens, where):
        """tokens (n, L), where (n, L) bool -> (R, vocab) filtered log-probabilities of the R
        positions in `where` (row-major), ready to draw from."""
        if self.guidance is not None:
            hidden = self._hidden(torch.cat([tokens, tokens]))
            n = tokens.shape[0]
            log_p = self.model._logits(hidden[:n][where]).float().log_softmax(-1)
            log_p_uncond = self.model._logits(hidden[n:][where]).float().log_softmax(-1)
            log_p = guided(log_p, log_p_uncond, self.guidance)
        else:
            log_p = self.model._logits(self._hidden(tokens)[where]).float()
        return filter_logits(log_p, self.temperature, self.top_k, self.top_p).log_softmax(-1)


def _draw(log_p, generator, per_row=None):
    """(R, V) log-probabilities of the positions `per_row` (B,) counts per image -> (R,)."""
    return multinomial(log_p.exp(), generator, per_row)


def absorbing_decode(predict, tokens, mask_token, times, generator=None, on_step=None,
                     on_progress=None):
    """The reverse absorbing process at the stride's `times` (stride_times; an int S: magic's
    S..1), one network evaluation each (module docstring); tokens (n, L) with mask_token where
    a value is to be drawn. on_step(tokens, decided) sees the start and each step that reveals
    tokens; on_progress(1 / steps) is called as each step starts."""
    masked = tokens == mask_token
    if isinstance(times, int):
        times = stride_times("magic", times, int(masked.sum(1).max()))
    if on_step is not None:
        on_step(tokens.clone(), ~masked)
    for i, t in enumerate(times):
        if on_progress is not None:
            on_progress(1 / len(times))
        later = times[i + 1] if i + 1 < len(times) else 0
        reveal = reveal_subset(masked, t, generator, later, len(times) - i - 1)
        if not reveal.any():  # completion: no image reveals anything at this step
            continue
        tokens[reveal] = _draw(predict.log_probs(tokens, reveal), generator, reveal.sum(1))
        masked &= ~reveal
        if on_step is not None:
            on_step(tokens.clone(), ~masked)
    return tokens


def maskgit_decode(predict, tokens, mask_token, times, choice_temperature, generator=None,
                   on_step=None, on_progress=None):
    """MaskGIT's confidence decoding at the stride's `times` (stride_times; an int S: cosine's
    S steps, MaskGIT's schedule), one network evaluation each (module docstring); on_step
    (tokens, decided) sees the start and each step's tokens that stay; on_progress(1 / steps)
    is called as each step starts."""
    masked = tokens == mask_token
    initially_masked = masked.sum(1)  # (n,)
    if isinstance(times, int):
        times = stride_times("cosine", times, int(initially_masked.max()))
    steps = len(times)
    # the images that can reveal one token per step keep one masked for each later step
    one_per_step = initially_masked >= steps
    device = tokens.device
    if on_step is not None:
        on_step(tokens.clone(), ~masked)
    for i in range(1, steps + 1):
        if not masked.any():
            break
        if on_progress is not None:
            on_progress(1 / steps)
        log_p = predict.log_probs(tokens, masked)  # (R, V) at every masked position
        drawn = _draw(log_p, generator, masked.sum(1))
        confidence = log_p.gather(1, drawn[:, None])[:, 0]
        noise_scale = choice_temperature * (1 - i / steps)
        if noise_scale > 0:
            uniform = _uniform(confidence.shape, generator, device, masked.sum(1))
            uniform = uniform.clamp(1e-20, 1 - 1e-7)
            confidence = confidence + noise_scale * -torch.log(-torch.log(uniform))
        scores = torch.full(tokens.shape, float("inf"), device=device)  # kept tokens stay
        scores[masked] = confidence
        tokens = tokens.masked_scatter(masked, drawn)
        later = times[i] if i < steps else 0
        remaining = (initially_masked * later / times[0]).floor().long()  # cosine: m0 cos(.)
        remaining = torch.where(one_per_step, remaining.clamp(min=steps - i), remaining)
        remaining = torch.minimum(remaining, (masked.sum(1) - 1).clamp(min=0))
        rank = scores.argsort(1).argsort(1)  # 0 = the least confident
        masked = rank < remaining[:, None]
        tokens = tokens.masked_fill(masked, mask_token)
        if on_step is not None:
            on_step(tokens.clone(), ~masked)
    return tokens


@dataclass
class AbsorbingSampling(SamplingConfig):
    """The absorbing prior's sampling settings: those of every prior, and its parallel
    decoding's (module docstring). The checks that need the model (steps against the grid's
    tokens, a grid at least the trained one) are sample()'s."""
    steps: Optional[int] = field(None, "network evaluations per grid (unset: as many as "
                                       "tokens; --stride quadratic: their square root; a "
                                       "list stride: its length)")
    stride: Optional[str] = field(None, "the times the network is called at: magic (S, S-1, "
                                        "..., 1; the absorbing sampler's default), all (one "
                                        "token per call), even, quadratic (large steps first), "
                                        "cosine (maskgit's default), or how many tokens each "
                                        "call reveals, e.g. 1,2,4,9 (summing to the grid's)")
    sampler: str = field("maskgit", "maskgit (confidence decoding, the default) or absorbing "
                                    "(the reverse process)")
    choice_temperature: Optional[float] = field(None, "maskgit: scale of the Gumbel noise on "
                                                      "the confidences that pick which drawn "
                                                      "tokens stay, annealed linearly to 0 over "
                                                      "the steps (unset: 4.5)")
    grid_h: Optional[int] = field(None, "sample a grid taller than the training one")
    grid_w: Optional[int] = field(None, "sample a grid wider than the training one")

    def validate(self, where="--{}"):
        super().validate(where)
        if self.sampler not in SAMPLERS:
            raise UserError(f"{where.format('sampler')} must be one of {', '.join(SAMPLERS)}, "
                            f"got '{self.sampler}'")
        if self.choice_temperature is not None and self.sampler != "maskgit":
            raise UserError(f"{where.format('choice_temperature')} is for "
                            f"{setting_name(where, 'sampler')} maskgit")
        if self.choice_temperature is not None and not 0 <= self.choice_temperature < math.inf:
            raise UserError(f"{where.format('choice_temperature')} must be >= 0, got "
                            f"{self.choice_temperature}")
        # (steps: sample() says "must be in 1..N", N the grid's tokens, which it alone knows)
        if self.stride is not None:
            counts = stride_counts(self.stride)
            if self.stride not in STRIDES and counts is None:
                raise UserError(f"{where.format('stride')} must be one of {', '.join(STRIDES)} "
                                f"or a list of tokens per network call such as 1,2,4,9, got "
                                f"'{self.stride}'")
            if self.stride == "all" and self.steps is not None:
                raise UserError(f"{where.format('stride')} all calls the network once per "
                                f"token: leave {setting_name(where, 'steps')} unset")
            if counts is not None and self.steps not in (None, len(counts)):
                raise UserError(f"{where.format('steps')} {self.steps} does not match "
                                f"{setting_name(where, 'stride')} {self.stride} "
                                f"({len(counts)} calls)")
        for name in ("grid_h", "grid_w"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{where.format(name)} must be at least 1, got "
                                f"{getattr(self, name)}")


# the registry's names (priors/__init__.py)
Config, Model, Sampling = AbsorbingConfig, Absorbing, AbsorbingSampling
TRAIN_DEFAULTS = {}
