"""Drawing tokens: logit filters, one position's values, and the raster loop of every prior that
draws one position per network evaluation (the GPT, the PixelCNN family).

Classifier-free guidance (Ho & Salimans 2021) combines the normalised log-probabilities of the
conditional and the unconditional model: log p = log p_u + w (log p_c - log p_u), renormalised.
w = 1 is plain conditional sampling, w = 0 unconditional, w > 1 sharpens towards the class.
"""

import itertools

import torch

from core.errors import UserError


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, K) logits -> (B, K) logits with temperature applied and the tails set to -inf."""
    logits = logits.float()
    if temperature != 1:  # dividing by 1 would only copy the (B, K) logits
        logits = logits / max(temperature, 1e-6)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already cover top_p of the mass
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop_sorted[..., 0] = False  # the likeliest token always stays (a tiny top_p in fp32)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(log_probs, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, V) log-probabilities -> (B,) values drawn after filtering."""
    probs = filter_logits(log_probs, temperature, top_k, top_p).softmax(-1)
    return multinomial(probs, generator)


# random numbers for batches of independent requests

class RowGenerators:
    """A batch made of blocks of consecutive rows, each with its own torch.Generator: block i
    (sizes[i] rows) draws exactly the numbers it would draw alone, as a batch of its own size,
    from generators[i]. So requests with their own seeds sample in one batch and get what they
    get alone (pipeline/served.py); the network's outputs must match too, which holds while no
    completion makes one block skip a step that another takes. Pass it as `generator`."""

    def __init__(self, generators, sizes):
        if len(generators) != len(sizes) or min(sizes, default=1) < 1:
            raise ValueError("one generator per block of at least one row")
        self.generators, self.sizes = list(generators), list(sizes)

    def blocks(self, per_row=None):
        """[(generator, start, stop)]: the items of a draw that each block owns. An item is a
        batch row, or with per_row (B,) counts, batch row b owns per_row[b] consecutive items
        (a step's drawn positions, row-major). Blocks owning nothing are left out, as a block
        alone skips a draw of nothing."""
        ends = list(itertools.accumulate(self.sizes))
        if per_row is not None:
            items = per_row.cumsum(0).tolist()
            ends = [items[end - 1] for end in ends]
        return [(g, start, stop) for g, start, stop in zip(self.generators, [0] + ends[:-1], ends)
                if stop > start]


def rand(shape, generator, device, per_row=None):
    """torch.rand(shape) from a torch.Generator or RowGenerators (shape[0] items, see
    RowGenerators.blocks)."""
    if not isinstance(generator, RowGenerators):
        return torch.rand(shape, generator=generator, device=device)
    return torch.cat([torch.empty((0, *shape[1:]), device=device)]
                     + [torch.rand((stop - start, *shape[1:]), generator=g, device=device)
                        for g, start, stop in generator.blocks(per_row)])


def multinomial(probs, generator, per_row=None):
    """(R, V) probabilities -> (R,) one value drawn per row, from a torch.Generator or
    RowGenerators (R items, see RowGenerators.blocks)."""
    if not isinstance(generator, RowGenerators):
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return torch.cat([torch.empty(0, dtype=torch.long, device=probs.device)]
                     + [torch.multinomial(probs[start:stop], 1, generator=g)[:, 0]
                        for g, start, stop in generator.blocks(per_row)])


MAX_GUIDANCE = 100.0  # far past any useful weight; beyond fp32's range it turns into inf * 0


def guided(log_p, log_p_uncond, guidance):
    return (log_p_uncond + guidance * (log_p - log_p_uncond)).log_softmax(-1)


def sample_position(head, out, temperature=1.0, top_k=None, top_p=None, generator=None,
                    out_uncond=None, guidance=None, known=None, known_here=None):
    """Draw one position's `head.channels` values from the head output out (B, out_dim).
    With out_uncond, apply guidance; where known_here (B, C) is set, keep known (B, C)."""
    state = head.begin(out)
    use_guidance = out_uncond is not None
    state_u = head.begin(out_uncond) if use_guidance else None
    values = []
    for c in range(head.channels):
        log_p = head.log_probs(out, state, c)
        if use_guidance:
            log_p = guided(log_p, head.log_probs(out_uncond, state_u, c), guidance)
        value = draw(log_p, temperature, top_k, top_p, generator)
        if known is not None:
            value = torch.where(known_here[:, c], known[:, c], value)
        if c + 1 < head.channels:  # the last channel's value conditions nothing after it
            state = head.observe(out, state, c, value)
            if use_guidance:
                state_u = head.observe(out_uncond, state_u, c, value)
        values.append(value)
    return torch.stack(values, -1)


def check_raster_prefix(known_mask, family):
    """A one-position-per-step prior can only keep a prefix in its raster order."""
    flat = known_mask.flatten(1).long()
    if (flat[:, 1:] > flat[:, :-1]).any():  # a kept token after a hidden one
        raise UserError(f"the {family} prior completes a raster prefix only (--keep top or "
                        f"--offset N); use the absorbing prior for other regions")


@torch.no_grad()
def sample_raster(model, n, labels=None, known=None, known_mask=None, temperature=1.0,
                  top_k=None, top_p=None, guidance=None, generator=None, on_step=None,
                  begin_options=None, on_progress=None):
    """Draw (n, grid_h, grid_w) tokens one position at a time, in raster order.

    `model` provides `positions` (P), `head` (with `channels` C; P * C = grid_h * grid_w), and
        begin(batch, labels, **begin_options) -> state
        step(state, p, tokens (batch, P, C)) -> head output (batch, out_dim) for position p,
            reading only positions < p of tokens.
    With guidance, the model runs on a doubled batch: the labels, then the null label.
    on_step(tokens, decided), when given, sees the grid before the first draw and after each
    position drawn (report_raster); on_progress(share), when given, is called after each
    position with the share of the draw it is (1 / P): a caller's progress bar."""
    config, head = model.config, model.head
    device = next(model.parameters()).device
    positions, channels = model.positions, head.channels
    use_guidance = guidance is not None and guidance != 1
    batch = 2 * n if use_guidance else n
    labels = model.labels_for(n, labels, device)
    if use_guidance:
        labels = torch.cat([labels, torch.full_like(labels, config.num_classes)])
    tokens = torch.zeros(batch, positions, channels, dtype=torch.long, device=device)
    if known is not None:
        check_raster_prefix(known_mask, model.family)
        known = known.to(device).view(n, positions, channels)
        known_mask = known_mask.to(device).view(n, positions, channels)
    grid = (config.grid_h, config.grid_w)
    # inference mode drops autograd's bookkeeping from every op (a fifth of a batch-1 step);
    # `tokens`, made outside it, stays an ordinary tensor that callers may edit in place. Not
    # under autocast: there autocast keeps its bf16 copies of the weights for the whole draw only
    # outside inference mode, and inside it casts every weight again at every step
    with torch.inference_mode(not torch.is_autocast_enabled(device.type)):
        state = model.begin(batch, labels, **(begin_options or {}))
        if on_step is not None:
            report_raster(on_step, tokens[:n], 0, grid, known, known_mask)
        for p in range(positions):
            out = model.step(state, p, tokens)
            out, out_u = (out[:n], out[n:]) if use_guidance else (out, None)
            here = known_mask[:, p] if known is not None else None
            if here is not None and bool(here.all()):
                values = known[:, p]  # nothing to draw at this position
            else:
                values = sample_position(head, out, temperature, top_k, top_p, generator, out_u,
                                         guidance, known[:, p] if here is not None else None,
                                         here)
            tokens[:n, p] = values
            if use_guidance:
                tokens[n:, p] = values
            if on_step is not None and not (here is not None and bool(here.all())):
                report_raster(on_step, tokens[:n], p + 1, grid, known, known_mask)
            if on_progress is not None:
                on_progress(1 / positions)
    return tokens[:n].reshape(n, config.grid_h, config.grid_w)


def report_raster(on_step, tokens, drawn, grid, known=None, known_mask=None):
    """Call on_step((n, h, w) tokens, (n, h, w) bool decided) for tokens (n, P, C) whose first
    `drawn` positions are drawn, the kept tokens shown from the start; grid = (h, w). Both
    tensors are fresh copies; where `decided` is False a token means nothing."""
    n, positions, channels = tokens.shape
    decided = (torch.arange(positions, device=tokens.device) < drawn)[None, :, None]
    decided = decided.expand(n, positions, channels)
    values = tokens.clone()
    if known is not None:
        decided = decided | known_mask
        values = torch.where(known_mask, known, values)
    on_step(values.reshape(n, *grid), decided.reshape(n, *grid))
