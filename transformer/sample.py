"""Sampling code grids from a GPT prior: batched, with a KV cache (one step per code)."""

import torch


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, K) logits -> (B, K) logits with temperature applied and the tails set to -inf."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already cover top_p of the mass
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(model, num_samples, temperature=1.0, top_k=None, top_p=None, generator=None,
           device=None):
    """Draw (num_samples, grid_h, grid_w) code grids, one cached forward step per code."""
    model.eval()
    config = model.config
    device = device or next(model.parameters()).device
    cache = model.new_cache(num_samples, device)
    tokens = torch.full((num_samples, 1), model.start_token, dtype=torch.long, device=device)
    codes = torch.empty(num_samples, config.block_size, dtype=torch.long, device=device)
    for t in range(config.block_size):
        logits = model.step(tokens, cache, t)[:, -1]  # (B, K)
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        codes[:, t] = tokens[:, 0]
    return codes.view(num_samples, config.grid_h, config.grid_w)


@torch.no_grad()
def sample_without_cache(model, num_samples, temperature=1.0, generator=None, device=None):
    """The slow reference: re-run the whole prefix at every step (for benchmarks and tests)."""
    model.eval()
    config = model.config
    device = device or next(model.parameters()).device
    codes = torch.zeros(num_samples, config.block_size, dtype=torch.long, device=device)
    for t in range(config.block_size):
        logits, _ = model(codes[:, :t + 1])  # position t reads codes < t only
        probs = filter_logits(logits[:, t], temperature).softmax(-1)
        codes[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return codes.view(num_samples, config.grid_h, config.grid_w)
