"""Output heads: how a prior's output vector at one position becomes a distribution over values.

A head holds no weights (the model's last linear layer produces `out_dim` numbers per position);
it says how to score targets and how to draw values. One position carries `channels` values:
1 for VQ codes, palette tokens, grey levels and the byte stream, 3 when a convolutional prior
predicts the R, G and B of one pixel from one network evaluation.

    nll(out (..., out_dim), values (..., channels)) -> (...) nats per position
    begin(out (B, out_dim)) -> state; log_probs(out, state, c) -> (B, V) normalised log-probs of
    channel c given the channels before it (recorded in `state` by observe(out, state, c, v)).

Sampling a position therefore draws channel after channel from an explicit categorical over
the V values, so temperature, top-k/top-p and classifier-free guidance act the same way for
every head (see priors/sampling.py).
"""

import math

import torch
import torch.nn.functional as F


class SoftmaxHead:
    """A categorical over the vocabulary, one value per position."""

    channels = 1

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.out_dim = vocab_size

    def nll(self, out, values):
        logits = out.float().reshape(-1, self.vocab_size)
        return F.cross_entropy(logits, values.reshape(-1), reduction="none").view(values.shape[:-1])

    def begin(self, out):
        return None

    def log_probs(self, out, state, channel):
        return out.float().log_softmax(-1)

    def observe(self, out, state, channel, values):
        return None


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class MixtureHead:
    """A discretized logistic mixture over V ordered values (Salimans et al. 2017, PixelCNN++).

    Value v in 0..V-1 sits at x = 2v/(V-1) - 1 in [-1, 1] and owns the bin x +- 1/(V-1); the
    edge bins extend to -inf and +inf, so the V probabilities sum to exactly 1. With several
    channels, each mixture component couples them linearly: channel j's mean is
    mu_j + sum_{i<j} coeff_ij * x_i (for RGB: G depends on R, B on R and G), and the pixel's
    likelihood is sum_m pi_m prod_j P_j(x_j | m, x_<j) — one network evaluation per pixel.

    Output layout per position, M components: [M weight logits | C*M means | C*M log-scales |
    C(C-1)/2*M coupling coefficients].
    """

    def __init__(self, vocab_size, mixtures=10, channels=1):
        self.vocab_size, self.mixtures, self.channels = vocab_size, mixtures, channels
        self.pairs = channels * (channels - 1) // 2
        self.out_dim = mixtures * (1 + 2 * channels + self.pairs)
        self.half_bin = 1.0 / (vocab_size - 1)

    def _split(self, out):
        """(..., out_dim) -> weight logits (..., M), means and log-scales (..., C, M),
        coefficients (..., pairs, M)."""
        m, c = self.mixtures, self.channels
        out = out.float()
        logits = out[..., :m]
        means = out[..., m:m + c * m].unflatten(-1, (c, m))
        log_scales = out[..., m + c * m:m + 2 * c * m].unflatten(-1, (c, m)).clamp(min=-7.0)
        coeffs = torch.tanh(out[..., m + 2 * c * m:].unflatten(-1, (self.pairs, m)))
        return logits, means, log_scales, coeffs

    def _pair(self, i, j):
        """Index of the coefficient coupling channel i into channel j (i < j)."""
        return j * (j - 1) // 2 + i

    def _channel_log_prob(self, mean, log_scale, values):
        """log P(value | logistic(mean, scale)) for the discretized bins; broadcasting shapes.
        `values` are integer indices 0..V-1."""
        x = values.float() * (2 * self.half_bin) - 1
        inv_scale = torch.exp(-log_scale)
        upper = inv_scale * (x - mean + self.half_bin)
        lower = inv_scale * (x - mean - self.half_bin)
        # sigma(upper) - sigma(lower) = sigma(upper) * sigma(-lower) * (1 - exp(lower - upper))
        middle = F.logsigmoid(upper) + F.logsigmoid(-lower) + _log1mexp(lower - upper)
        first = F.logsigmoid(upper)  # value 0: everything below its upper edge
        last = F.logsigmoid(-lower)  # value V-1: everything above its lower edge
        return torch.where(values == 0, first,
                           torch.where(values == self.vocab_size - 1, last, middle))

    def _mean(self, means, coeffs, previous_x, j):
        """Channel j's mean per component given the earlier channels' positions x (..., j)."""
        mean = means[..., j, :]
        for i in range(j):
            mean = mean + coeffs[..., self._pair(i, j), :] * previous_x[..., i:i + 1]
        return mean

    def nll(self, out, values):
        logits, means, log_scales, coeffs = self._split(out)
        x = values.float() * (2 * self.half_bin) - 1  # (..., C)
        log_p = logits.log_softmax(-1)  # (..., M)
        for j in range(self.channels):
            mean = self._mean(means, coeffs, x, j)
            log_p = log_p + self._channel_log_prob(mean, log_scales[..., j, :],
                                                   values[..., j:j + 1])
        return -torch.logsumexp(log_p, -1)

    # sampling, channel by channel, from the exact categorical over the V values

    def begin(self, out):
        logits, means, log_scales, coeffs = self._split(out)
        # state: log posterior weights of the components given the channels drawn so far, and
        # those channels' positions in [-1, 1]
        return {"log_w": logits.log_softmax(-1), "x": out.new_zeros(out.shape[0], self.channels),
                "parts": (means, log_scales, coeffs)}

    def _all_values(self, out, state, channel):
        """log P_channel(v | m, x_<channel) for every v: (B, M, V)."""
        means, log_scales, coeffs = state["parts"]
        mean = self._mean(means, coeffs, state["x"], channel)  # (B, M)
        values = torch.arange(self.vocab_size, device=out.device)
        return self._channel_log_prob(mean[..., None], log_scales[:, channel, :, None], values)

    def log_probs(self, out, state, channel):
        joint = state["log_w"][..., None] + self._all_values(out, state, channel)  # (B, M, V)
        return torch.logsumexp(joint, 1) - torch.logsumexp(state["log_w"], -1, keepdim=True)

    def observe(self, out, state, channel, values):
        per_value = self._all_values(out, state, channel)  # (B, M, V)
        index = values.view(-1, 1, 1).expand(-1, self.mixtures, 1)
        x = state["x"].clone()
        x[:, channel] = values.float() * (2 * self.half_bin) - 1
        return {**state, "log_w": state["log_w"] + per_value.gather(2, index)[..., 0], "x": x}


def make_head(config, channels=1):
    """The head a prior config asks for (config.head, config.mixtures): softmax over the
    vocabulary, or a logistic mixture over ordered values, for `channels` values per position."""
    from core.errors import UserError
    if config.head == "softmax":
        if channels != 1:
            raise UserError(f"the softmax head takes one value per position; this prior puts "
                            f"{channels} channels in one position: use --head mixture")
        return SoftmaxHead(config.vocab_size)
    if config.head == "mixture":
        if not config.ordered:
            raise UserError("--head mixture needs ordered tokens (a `pixels` tokenizer in "
                            "`levels` mode); VQ codes and palette entries have no order")
        if config.vocab_size < 2 or config.mixtures < 1:
            raise UserError("--head mixture needs at least 2 values and 1 mixture component")
        return MixtureHead(config.vocab_size, config.mixtures, channels)
    raise UserError(f"--head must be softmax or mixture, got '{config.head}'")
