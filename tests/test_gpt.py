"""The GPT prior, for every attention kind: causality, the sampling cache (keys and values for
softmax, running sums for the linear kinds) against the full forward, the local window mask,
sampling filters."""

import pytest
import torch

from priors.sampling import filter_logits
from transformer.gpt import GPT, GPTConfig, attention_mask, sample_without_cache


# (attention kind, window): every kind, and softmax with a local window
SETTINGS = [("softmax", None), ("softmax", 1), ("linear", None), ("momentum", None)]


def tiny(window_size=None, grid=(4, 5), attention="softmax"):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=16, grid_h=grid[0], grid_w=grid[1], n_layer=2, n_head=2,
                       n_embd=32, dropout=0.0, window_size=window_size, attention=attention)
    return GPT(config).eval()


@pytest.mark.parametrize("attention,window_size", SETTINGS)
def test_changing_a_later_code_never_changes_earlier_logits(attention, window_size):
    model = tiny(window_size, attention=attention)
    codes = torch.randint(16, (2, 20))
    logits, _ = model(codes)
    for t in (0, 7, 19):
        changed = codes.clone()
        changed[:, t] = (changed[:, t] + 1) % 16
        changed_logits, _ = model(changed)
        # position t predicts code t from codes < t: positions <= t must not move
        torch.testing.assert_close(changed_logits[:, :t + 1], logits[:, :t + 1])
        if t < 19:
            assert not torch.allclose(changed_logits[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("attention,window_size", SETTINGS)
def test_cached_steps_give_the_full_forward_logits(attention, window_size):
    model = tiny(window_size, attention=attention)
    codes = torch.randint(16, (3, 20))
    full, _ = model(codes)
    tokens = torch.cat([torch.full((3, 1), model.start_token), codes[:, :-1]], 1)
    cache = model.new_cache(3)
    stepped = torch.cat([model.forward_cached(tokens[:, t:t + 1], cache, t) for t in range(20)], 1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    cache = model.new_cache(3)  # a prefix of several tokens, then single steps
    chunked = torch.cat([model.forward_cached(tokens[:, :6], cache, 0)] +
                        [model.forward_cached(tokens[:, t:t + 1], cache, t) for t in range(6, 20)], 1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)


def slow_window_mask(grid_h, grid_w, window):
    size = grid_h * grid_w
    mask = torch.zeros(size, size, dtype=torch.bool)
    for query in range(size):
        for key in range(size):
            qr, qc = divmod(query, grid_w)
            kr, kc = divmod(key, grid_w)
            mask[query, key] = key <= query and abs(qr - kr) <= window and abs(qc - kc) <= window
    return mask


@pytest.mark.parametrize("grid,window", [((4, 5), 1), ((5, 5), 2), ((3, 7), 0), ((4, 4), 9)])
def test_window_mask_equals_the_slow_obvious_one(grid, window):
    assert torch.equal(attention_mask(*grid, window), slow_window_mask(*grid, window))


def test_window_limits_what_a_position_sees():
    model = tiny(window_size=1, grid=(5, 5))
    codes = torch.randint(16, (1, 25))
    logits, _ = model(codes)
    far = codes.clone()
    far[:, 0] = (far[:, 0] + 3) % 16  # cell (0, 0); position 24 = cell (4, 4) is far from it
    # Outside the window in every layer's receptive field? Two layers of radius 1 reach 2 cells:
    # (4, 4) is 4 cells away, so position 24 cannot see code 0 at all.
    torch.testing.assert_close(model(far)[0][:, 24], logits[:, 24])


@pytest.mark.parametrize("attention", ["softmax", "linear", "momentum"])
def test_sampling_with_and_without_cache_draws_the_same_codes(attention):
    model = tiny(attention=attention)
    a = model.sample(4, generator=torch.Generator().manual_seed(1))
    b = sample_without_cache(model, 4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 4, 5) and torch.equal(a, b)


def test_top_k_and_top_p_keep_the_likeliest_codes():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))[0].tolist()
    assert kept == [True, True, False, False, False] and probs[0] < 0.8 < probs[:2].sum()
    assert torch.isfinite(filter_logits(logits, top_p=0.5))[0].tolist()[:2] == [True, False]
