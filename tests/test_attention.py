"""The linear attention kinds (transformer/attention.py): the parallel form computes the literal
recurrence at every position, over chunk boundaries; the normaliser stays finite and bounded on
long sequences; the sampler's state does not grow with the sequence."""

import pytest
import torch

from core.errors import UserError
from transformer.attention import CHUNK, EPS, LinearAttention, feature_map
from transformer.gpt import GPT, GPTConfig

# (kind, mu, stepsize): linear, the default momentum, a strong one with a large step
KINDS = [("linear", 0.0, 1.0), ("momentum", 0.6, 0.4), ("momentum", 0.9, 2.0)]


def config(attention="linear", mu=0.6, stepsize=0.4, grid=(4, 5), **overrides):
    return GPTConfig(**{**dict(vocab_size=16, grid_h=grid[0], grid_w=grid[1], n_layer=2,
                               n_head=2, n_embd=32, dropout=0.0, attention=attention, mu=mu,
                               stepsize=stepsize), **overrides})


def literal_recurrence(layer, x, mu, stepsize, momentum):
    """The recurrence as the papers write it, one position at a time, in plain loops."""
    b, length, c = x.shape
    heads = layer.n_head
    q, k, v = (part.view(b, length, heads, c // heads) for part in layer.qkv(x).split(c, 2))
    q, k = feature_map(q), feature_map(k)
    S = torch.zeros(b, heads, c // heads, c // heads)
    P, z = torch.zeros_like(S), torch.zeros(b, heads, c // heads)
    out = []
    for i in range(length):
        kv = k[:, i, :, :, None] * v[:, i, :, None, :]  # phi(k_i) v_i^T per head
        if momentum:
            P = mu * P - stepsize * kv
            S = S - P
        else:
            S = S + kv
        z = z + k[:, i]
        numerator = torch.einsum("bhd,bhde->bhe", q[:, i], S)
        out.append(numerator / ((q[:, i] * z).sum(-1, keepdim=True) + EPS))
    return layer.proj(torch.stack(out, 1).reshape(b, length, c))


@pytest.mark.parametrize("kind,mu,stepsize", KINDS)
def test_parallel_form_is_the_literal_recurrence_at_every_position(kind, mu, stepsize):
    torch.manual_seed(0)
    layer = LinearAttention(config(kind, mu, stepsize)).eval()
    x = torch.randn(2, 2 * CHUNK + 21, 32)  # three chunks, the last one partial
    with torch.no_grad():
        expected = literal_recurrence(layer, x, mu, stepsize, kind == "momentum")
        torch.testing.assert_close(layer(x), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "momentum"])
def test_recurrent_steps_and_chunked_prompts_match_the_parallel_forward_over_chunks(kind):
    torch.manual_seed(0)
    model = GPT(config(kind, grid=(10, 20))).eval()  # 200 positions: 4 chunks
    codes = torch.randint(16, (2, 200))
    with torch.no_grad():
        full, _ = model(codes)
        inputs = model._inputs(codes)
        cache = model.new_cache(2)  # a 70-token prompt, one of 80, then single steps
        parts = [model.forward_cached(inputs[:, :70], cache, 0),
                 model.forward_cached(inputs[:, 70:150], cache, 70)]
        parts += [model.forward_cached(inputs[:, t:t + 1], cache, t) for t in range(150, 200)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "linear", "momentum"])
def test_a_prefix_scores_the_same_whatever_the_length_of_the_sequence(kind):
    """Position i must not depend on how many positions follow it — not on their values (the
    causality test) and not on their number (a weight by sequence length would break this)."""
    torch.manual_seed(0)
    model = GPT(config(kind, grid=(10, 20))).eval()
    codes = torch.randint(16, (2, 200))
    with torch.no_grad():
        full, _ = model(codes)
        for length in (1, 37, CHUNK, 150):
            torch.testing.assert_close(model(codes[:, :length])[0], full[:, :length],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,mu,stepsize", KINDS)
def test_normaliser_stays_finite_and_outputs_bounded_on_long_sequences(kind, mu, stepsize):
    """4,096 positions with large queries and keys (features from 0 to ~100): the output is
    a positively weighted average of the values, scaled by at most s / (1 - mu), in the
    parallel form and after 4,096 recurrent steps alike."""
    torch.manual_seed(0)
    model = GPT(config(kind, mu, stepsize, n_layer=1))  # 2 heads of 16 dimensions
    layer, cache = model.blocks[0].attn, model.new_cache(1)
    length, heads, dim = 4096, 2, 16
    q, k = (30 * torch.randn(1, heads, length, dim) for _ in range(2))
    q[:, :, 100] = -200  # a query whose features all underflow to 0: 0 / (0 + eps), not 0 / 0
    q, k = feature_map(q), feature_map(k)
    v = torch.randn(1, heads, length, dim)
    state = layer._state_of(None, 0, 1, q)
    with torch.no_grad():
        parallel = layer._chunks(q, k, v, state)
        stepped = torch.cat([layer._step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1],
                                         cache, 0) for i in range(length)], 2)
    bound = v.abs().amax() * (stepsize / (1 - mu)) * (1 + 1e-4)
    for y in (parallel, stepped):
        assert torch.isfinite(y).all() and y.abs().amax() <= bound
    torch.testing.assert_close(stepped, parallel, atol=1e-4, rtol=1e-3)
    # the running sums reach ~1e5: they agree to fp32 accumulation error of that scale
    assert (cache.S[0] - state["S"]).abs().amax() < 1e-5 * state["S"].abs().amax()


def test_the_sampler_state_does_not_grow_with_the_sequence():
    small = GPT(config("momentum", grid=(4, 4))).new_cache(3)
    large = GPT(config("momentum", grid=(32, 96))).new_cache(3)  # 3,072 positions
    assert small.nbytes == large.nbytes == 2 * 3 * 2 * (2 * 16 * 16 + 16) * 4  # fp32
    assert small.S.dtype == torch.float32


def test_linear_attention_settings_are_checked():
    with pytest.raises(UserError, match="--window_size works with --attention softmax only"):
        GPT(config("linear", window_size=1))
    with pytest.raises(UserError, match="--attention must be one of softmax, linear, momentum"):
        GPT(config("performer"))
    with pytest.raises(UserError, match=r"--mu must be in \[0, 1\)"):
        GPT(config("momentum", mu=1.0))


def test_hidden_states_are_the_residual_stream_of_every_layer():
    torch.manual_seed(0)
    model = GPT(config("linear")).eval()
    tokens = torch.randint(16, (3, 4, 5))
    hidden = model.hidden_states(tokens)
    assert len(hidden) == 3 and all(h.shape == (3, 20, 32) for h in hidden)
    out, _ = model(tokens)  # the head reads the last layer's stream
    torch.testing.assert_close(model.head_proj(model.ln_f(hidden[-1])), out)
