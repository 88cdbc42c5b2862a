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

Sampling (`sample(..., sampler=, steps=S)`), both samplers in S network evaluations:
    absorbing  the reverse process in S steps: at step t = S..1 each still-masked position is
               revealed with probability 1/t. We reveal a uniformly random subset of the m masked
               positions whose size is floor(m/t) or ceil(m/t), with mean m/t (randomised
               rounding): each position's probability is exactly 1/t, and since m >= t at every
               step (when it starts with m >= S) at least one token is revealed per step and the
               last step reveals the rest. Revealed values are drawn from the (guided, filtered)
               prediction.
    maskgit    confidence decoding: at step i = 1..S draw a value for every masked position;
               `temperature` divides the logits these values are drawn from (as for every
               prior). Each drawn value's confidence is its log-probability under that same
               distribution, plus Gumbel noise of scale choice_temperature * (1 - i/S) (annealed
               linearly to 0 at the last step). The floor(m0 cos(pi/2 i/S)) least confident
               positions are masked again (m0: the masked count at the start), at most m - 1 of
               the m masked now, so every step reveals at least one token and the last reveals
               all.
When completion leaves an image fewer masked tokens than steps, the batch runs min(S, the
largest masked count) steps; an image with fewer masked tokens than that simply has steps in
which none of its tokens is revealed (the absorbing rule then skips the network evaluation when
no image of the batch reveals anything).

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
from priors.sampling import filter_logits, guided
from priors.settings import SamplingConfig, setting_name
from transformer.block import Block, SelfAttention
from transformer.init import init_gpt2

LOSSES = ("elbo", "reweighted_elbo", "mlm")
SAMPLERS = ("absorbing", "maskgit")


@dataclass
class AbsorbingConfig(PriorConfig):
    n_layer: int = field(4, "transformer blocks")
    n_head: int = field(4, "attention heads")
    n_embd: int = field(128, "width of the transformer")
    dropout: float = field(0.1, "dropout in the blocks")
    timesteps: Optional[int] = field(None, "diffusion steps T (default: the number of tokens)")
    loss: str = field("reweighted_elbo", "training loss weighting: " + ", ".join(LOSSES) +
                      " (see transformer/absorbing.py)")

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


# helpers

def _uniform(shape, generator, device):
    return torch.rand(shape, generator=generator, device=device)


def reveal_subset(masked, t, generator=None):
    """(B, L) bool masked positions -> (B, L) bool, a uniformly random subset of each row's m
    masked positions of size floor(m/t) or ceil(m/t), mean m/t: each masked position is chosen
    with probability exactly 1/t, and at least one when m >= t."""
    device = masked.device
    expected = masked.sum(1) / t  # (B,)
    count = expected.floor() + (_uniform(expected.shape, generator, device) < expected.frac())
    scores = _uniform(masked.shape, generator, device).masked_fill(~masked, 2.0)
    rank = scores.argsort(1).argsort(1)  # the masked positions take ranks 0..m-1, in random order
    return rank < count[:, None]


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

    # the network

    def _hidden(self, tokens, labels=None):
        """tokens (B, L) over the trained grid, mask token included -> (B, L, n_embd)."""
        x = self.token_embedding(tokens) + self.position_embedding.weight
        if labels is not None:
            x = x + self.label_embedding(labels)[:, None]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return x

    def _logits(self, hidden):
        return self.head_proj(self.ln_f(hidden))

    def corrupt(self, tokens, generator=None):
        """(B, L) tokens -> t (B,) in 1..T and the masked positions (B, L) bool, each token
        masked with probability t/T."""
        steps, device = self.config.steps, tokens.device
        t = torch.randint(1, steps + 1, (tokens.shape[0],), generator=generator, device=device)
        masked = _uniform(tokens.shape, generator, device) < (t / steps)[:, None]
        return t, masked

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
        t, masked = self.corrupt(codes)
        ce, out = self._masked_ce(codes, labels, t, masked)
        total, steps, length = ce.sum(1), self.config.steps, codes.shape[1]
        if self.config.loss == "elbo":
            loss = (steps / t * total).mean() / length
        elif self.config.loss == "reweighted_elbo":
            loss = ((1 - (t - 1) / steps) * total).mean() / length
        else:  # mlm
            loss = (total / masked.sum(1).clamp(min=1)).mean()
        return out, loss

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
               choice_temperature=None, grid_h=None, grid_w=None, **options):
        """(n, grid_h, grid_w) tokens in `steps` network evaluations (module docstring); the
        settings are AbsorbingSampling's."""
        s = self.sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                                   steps=steps, guidance=guidance, sampler=sampler,
                                   choice_temperature=choice_temperature, grid_h=grid_h,
                                   grid_w=grid_w, **options)
        self.check_sample_args(s.guidance, labels)
        sampler = s.sampler or "absorbing"
        height, width = self._sample_grid(s.grid_h, s.grid_w)
        length = height * width
        steps = length if s.steps is None else s.steps
        if not 1 <= steps <= length:
            raise UserError(f"--steps must be in 1..{length} (the tokens of a {height}x{width} "
                            f"grid), got {steps}")
        device = self.position_embedding.weight.device
        tokens = torch.full((n, length), self.mask_token, dtype=torch.long, device=device)
        if known is not None:
            if known.shape != (n, height, width) or known_mask.shape != known.shape:
                raise ValueError(f"known and known_mask must be ({n}, {height}, {width})")
            tokens = torch.where(known_mask.to(device).reshape(n, length),
                                 known.to(device).reshape(n, length), tokens)
        predict = Predictor(self, n, (height, width), labels, s.guidance, s.temperature, s.top_k,
                            s.top_p, device)
        if sampler == "absorbing":
            tokens = absorbing_decode(predict, tokens, self.mask_token, steps, generator)
        else:
            choice = 4.5 if s.choice_temperature is None else s.choice_temperature
            tokens = maskgit_decode(predict, tokens, self.mask_token, steps, choice, generator)
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


def _draw(log_p, generator):
    return torch.multinomial(log_p.exp(), 1, generator=generator)[:, 0]


def absorbing_decode(predict, tokens, mask_token, steps, generator=None):
    """The reverse absorbing process in `steps` steps (module docstring); tokens (n, L) with
    mask_token where a value is to be drawn."""
    masked = tokens == mask_token
    steps = min(steps, int(masked.sum(1).max()))
    for t in range(steps, 0, -1):
        reveal = reveal_subset(masked, t, generator)
        if not reveal.any():  # completion: no image reveals anything at this step
            continue
        tokens[reveal] = _draw(predict.log_probs(tokens, reveal), generator)
        masked &= ~reveal
    return tokens


def maskgit_decode(predict, tokens, mask_token, steps, choice_temperature, generator=None):
    """MaskGIT's confidence decoding with the cosine schedule (module docstring)."""
    masked = tokens == mask_token
    initially_masked = masked.sum(1)  # (n,)
    steps = min(steps, int(initially_masked.max()))
    device = tokens.device
    for i in range(1, steps + 1):
        if not masked.any():
            break
        log_p = predict.log_probs(tokens, masked)  # (R, V) at every masked position
        drawn = _draw(log_p, generator)
        confidence = log_p.gather(1, drawn[:, None])[:, 0]
        noise_scale = choice_temperature * (1 - i / steps)
        if noise_scale > 0:
            uniform = _uniform(confidence.shape, generator, device).clamp(1e-20, 1 - 1e-7)
            confidence = confidence + noise_scale * -torch.log(-torch.log(uniform))
        scores = torch.full(tokens.shape, float("inf"), device=device)  # kept tokens stay
        scores[masked] = confidence
        tokens = tokens.masked_scatter(masked, drawn)
        remaining = (initially_masked * math.cos(math.pi / 2 * i / steps)).floor().long()
        remaining = torch.minimum(remaining, (masked.sum(1) - 1).clamp(min=0))
        rank = scores.argsort(1).argsort(1)  # 0 = the least confident
        masked = rank < remaining[:, None]
        tokens = tokens.masked_fill(masked, mask_token)
    return tokens


@dataclass
class AbsorbingSampling(SamplingConfig):
    """The absorbing prior's sampling settings: those of every prior, and its parallel
    decoding's (module docstring). The checks that need the model (steps against the grid's
    tokens, a grid at least the trained one) are sample()'s."""
    steps: Optional[int] = field(None, "network evaluations per grid (unset: as many as "
                                       "tokens)")
    sampler: Optional[str] = field(None, "absorbing (the reverse process; unset: this one) "
                                         "or maskgit (confidence decoding)")
    choice_temperature: Optional[float] = field(None, "maskgit: scale of the Gumbel noise on "
                                                      "the confidences that pick which drawn "
                                                      "tokens stay, annealed linearly to 0 over "
                                                      "the steps (unset: 4.5)")
    grid_h: Optional[int] = field(None, "sample a grid taller than the training one")
    grid_w: Optional[int] = field(None, "sample a grid wider than the training one")

    def validate(self, where="--{}"):
        super().validate(where)
        sampler = self.sampler or "absorbing"
        if sampler not in SAMPLERS:
            raise UserError(f"{where.format('sampler')} must be one of {', '.join(SAMPLERS)}, "
                            f"got '{sampler}'")
        if self.choice_temperature is not None and sampler != "maskgit":
            raise UserError(f"{where.format('choice_temperature')} is for "
                            f"{setting_name(where, 'sampler')} maskgit")
        if self.choice_temperature is not None and not 0 <= self.choice_temperature < math.inf:
            raise UserError(f"{where.format('choice_temperature')} must be >= 0, got "
                            f"{self.choice_temperature}")
        # (steps: sample() says "must be in 1..N", N the grid's tokens, which it alone knows)
        for name in ("grid_h", "grid_w"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{where.format(name)} must be at least 1, got "
                                f"{getattr(self, name)}")


# the registry's names (priors/__init__.py)
Config, Model, Sampling = AbsorbingConfig, Absorbing, AbsorbingSampling
TRAIN_DEFAULTS = {}
