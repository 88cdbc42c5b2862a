"""What every prior shares: the config fields set by the data, class labels, and the interface.

    forward(tokens, labels=None) -> (out, loss)   out: head parameters per position; loss: the
                                                  training objective, in nats per token
    nll(tokens, labels=None, generator=None) -> (N,) nats per image: exact for priors that draw
                                                  one position per step, a bound (ELBO) for
                                                  absorbing diffusion (`nll_is_bound`)
    sample(n, labels=None, known=None, known_mask=None, temperature=1.0, top_k=None,
           top_p=None, steps=None, guidance=None, generator=None, on_step=None,
           on_progress=None, **options) -> (n, h, w)
        the keyword settings are the fields of the family's sampling dataclass
        (priors/settings.py; `sampling_settings` builds and checks it); a prior refuses an
        option its family does not take. on_step(tokens (n, h, w), decided (n, h, w) bool),
        when given, is called with the grid before the first step and after every step that
        draws a token (where `decided` is False a token means nothing): GIFs of sampling.
        on_progress(share), when given, is called at every network evaluation with the share
        of the draw it is (the shares sum to at most 1): progress bars; a prior alone prints
        nothing

tokens are (N, grid_h, grid_w) integers in [0, vocab_size); labels (N,) class ids in
[0, num_classes). `known`/`known_mask` (n, h, w) is completion: keep those tokens, draw the
rest. A family is a model file with a config dataclass (subclassing PriorConfig) and a model
class (subclassing Prior), plus one line in priors/__init__.py.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from core.config import field
from core.errors import UserError
import priors  # the registry: a family's own sampling dataclass
from priors.heads import make_head
from priors.settings import SamplingConfig


# PriorConfig fields set from the tokens, never by a flag
DATA_FIELDS = ("vocab_size", "grid_h", "grid_w", "channels", "ordered", "num_classes")


@dataclass
class PriorConfig:
    # set from the tokens (DATA_FIELDS), never by a flag
    vocab_size: int = field(512, "K token values (VQ codes, pixel levels, palette entries)")
    grid_h: int = field(16, "token grid rows")
    grid_w: int = field(16, "token grid columns (for RGB levels: 3 values per pixel)")
    channels: int = field(1, "values per pixel along a row: 3 for RGB levels, else 1")
    ordered: bool = field(False, "token values are ordered intensities (pixels levels)")
    num_classes: int = field(0, "0: unconditional; else labels 0..num_classes-1, and the null "
                                "label num_classes")
    # the user's
    head: str = field("softmax", "output head: softmax over the vocabulary, or mixture (a "
                                 "discretized logistic mixture; ordered tokens only)")
    mixtures: int = field(10, "logistic components of the mixture head")
    label_dropout: float = field(0.1, "with --conditional: share of training examples seen "
                                      "without their label (what guidance pushes away from)")

    @property
    def block_size(self):
        return self.grid_h * self.grid_w

    def validate(self):
        if not 0 <= self.label_dropout < 1:
            raise UserError(f"--label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.grid_w % self.channels:
            raise UserError(f"grid width {self.grid_w} is not a multiple of {self.channels} "
                            f"values per pixel")


class Prior(nn.Module):
    family = None          # the registry name
    nll_is_bound = False   # True when nll() is an upper bound (an ELBO), not exact
    whole_pixels = False   # one position = a pixel's `channels` values (convolutional priors),
                           # else one position per token (the transformers' byte stream)

    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        self.head = make_head(config, config.channels if self.whole_pixels else 1)

    # labels

    def make_label_embedding(self, dim):
        """A table of num_classes + 1 label vectors (the last is the null label), or None."""
        return nn.Embedding(self.config.num_classes + 1, dim) if self.config.num_classes else None

    def labels_for(self, batch, labels, device):
        """(batch,) class ids for a conditional prior (the null label where none are given);
        None for an unconditional one."""
        num_classes = self.config.num_classes
        if num_classes == 0:
            if labels is not None:
                raise UserError("this prior was trained without --conditional: it takes no labels")
            return None
        if labels is None:
            return torch.full((batch,), num_classes, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        if labels.shape != (batch,) or labels.min() < 0 or labels.max() > num_classes:
            raise ValueError(f"labels must be (batch,) ids in [0, {num_classes}]")
        return labels

    def training_labels(self, labels, batch, device):
        """labels_for(), with label dropout while training (so guidance has an unconditional
        model to push away from)."""
        labels = self.labels_for(batch, labels, device)
        if labels is not None and self.training and self.config.label_dropout > 0:
            drop = torch.rand(batch, device=device) < self.config.label_dropout
            labels = labels.masked_fill(drop, self.config.num_classes)
        return labels

    def sampling_settings(self, **settings):
        """sample()'s keyword settings as this family's sampling dataclass, checked (None: not
        given); a UserError for an option the family does not take."""
        registered = self.family in priors.FAMILIES  # else a model outside the registry
        return priors.sampling_settings(self.family, settings,
                                        kind=None if registered else SamplingConfig)

    def check_sample_args(self, guidance, labels):
        if guidance is not None and guidance != 1:
            if self.config.num_classes == 0:
                raise UserError("--guidance needs a prior trained with --conditional")
            if labels is None:
                raise UserError("--guidance needs --labels (the classes to guide towards)")

    # the interface (see the module docstring)

    def forward(self, tokens, labels=None):
        raise NotImplementedError

    def nll(self, tokens, labels=None, generator=None):
        raise NotImplementedError

    def sample(self, n, labels=None, known=None, known_mask=None, temperature=1.0, top_k=None,
               top_p=None, steps=None, guidance=None, generator=None, on_step=None,
               on_progress=None, **options):
        raise NotImplementedError


class RasterPrior(Prior):
    """A prior that draws one position per network evaluation, in raster order. The position
    is a token, or a pixel of `channels` tokens for the PixelCNN family. Subclasses implement
    `forward` (returning head outputs per position), `begin` and `step` (priors/sampling.py)."""

    @property
    def positions(self):
        return self.config.block_size // self.head.channels

    def position_values(self, tokens):
        """(N, h, w) tokens -> (N, P, C) values per position, in raster order."""
        return tokens.reshape(tokens.shape[0], self.positions, self.head.channels)

    def nll(self, tokens, labels=None, generator=None):
        out, _ = self(tokens, labels)  # (N, P, out_dim)
        return self.head.nll(out, self.position_values(tokens)).sum(1)

    def sample(self, n, labels=None, known=None, known_mask=None, temperature=1.0, top_k=None,
               top_p=None, steps=None, guidance=None, generator=None, on_step=None,
               on_progress=None, **options):
        from priors.sampling import sample_raster
        # one position per step: `steps` (the parallel decoders') is refused like any option
        # the family's sampling dataclass lacks
        s = self.sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                                   steps=steps, guidance=guidance, **options)
        self.check_sample_args(s.guidance, labels)
        return sample_raster(self, n, labels, known, known_mask, s.temperature, s.top_k, s.top_p,
                             s.guidance, generator, on_step=on_step,
                             begin_options=self.begin_options(s), on_progress=on_progress)

    def begin_options(self, settings):
        """The keywords `begin` takes from the family's own sampling settings (the GPT's
        cache_dtype); none by default."""
        return {}
