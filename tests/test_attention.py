"""The linear attention kinds (transformer/attention.py) and the momentum residual connection
(transformer/block.py): the parallel form computes the literal recurrence at every position,
over chunk boundaries; recurrent sampling gives the parallel forward's logits for every kind and
option; the normaliser stays finite and bounded on long sequences; the sampler's state does not
grow with the sequence; checkpoints from before the momentum options load unchanged."""

import argparse
from dataclasses import asdict

import pytest
import torch

import priors
from core.config import add_flags, build, given
from core.errors import UserError
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from transformer.attention import CHUNK, EPS, LinearAttention, feature_map
from transformer.block import Block, MomentumBlock
from transformer.gpt import GPT, GPTConfig, sample_without_cache

# (kind, mu, stepsize): linear, the default momentum, a strong one with a large step
KINDS = [("linear", 0.0, 1.0), ("momentum", 0.6, 0.4), ("momentum", 0.9, 2.0)]
# the momentum family's options, each with recurrent sampling: the seed's three momentum
# trainings (momentum attention; + momentum residual; + adaptive residual), adaptive momentum in
# attention (--delta), and the residual options with the other attention kinds
OPTIONS = [
    {"attention": "linear"},
    {"attention": "momentum"},
    {"attention": "momentum", "mu": 0.6, "stepsize": 0.9, "res_mu": 0.1, "res_stepsize": 0.99},
    {"attention": "momentum", "mu": 0.6, "stepsize": 0.9, "adaptive_type": "nc",
     "res_stepsize": 0.99},
    {"attention": "adaptive_momentum", "stepsize": 0.9},
    {"attention": "adaptive_momentum", "delta": 0.05, "adaptive_type": "nc", "is_resw": True},
    {"attention": "linear", "res_mu": 0.5, "res_stepsize": 0.7, "is_resw": True},
    {"attention": "softmax", "res_mu": 0.3},
    {"attention": "softmax", "adaptive_type": "nc", "res_delta": 0.01},
]
NEW_FIELDS = ("delta", "res_mu", "res_stepsize", "adaptive_type", "res_delta", "is_resw")


def option_id(option):
    return " ".join(f"{k}={v}" for k, v in option.items())


def config(attention="linear", mu=0.6, stepsize=0.4, grid=(4, 5), **overrides):
    return GPTConfig(**{**dict(vocab_size=16, grid_h=grid[0], grid_w=grid[1], n_layer=2,
                               n_head=2, n_embd=32, dropout=0.0, attention=attention, mu=mu,
                               stepsize=stepsize), **overrides})


def literal_recurrence(layer, x, mu, stepsize, momentum, delta=None):
    """The recurrence as the papers write it, one position at a time, in plain loops; with
    `delta`, adaptive momentum from the (hs x hs) matrices U_i = phi(k_i) v_i^T themselves."""
    b, length, c = x.shape
    heads = layer.n_head
    q, k, v = (part.view(b, length, heads, c // heads) for part in layer.qkv(x).split(c, 2))
    q, k = feature_map(q), feature_map(k)
    S = torch.zeros(b, heads, c // heads, c // heads)
    P, z = torch.zeros_like(S), torch.zeros(b, heads, c // heads)
    out, kv_before = [], None
    for i in range(length):
        kv = k[:, i, :, :, None] * v[:, i, :, None, :]  # phi(k_i) v_i^T per head
        if delta is not None and kv_before is not None:
            ratio = (torch.linalg.matrix_norm(kv - kv_before)
                     / torch.linalg.matrix_norm(kv_before))  # (B, nh)
            mu = ((1 - ratio.sqrt()) ** 2).clamp(0, 1 - delta)[..., None, None]
        kv_before = kv
        if momentum:
            P = mu * P - stepsize * kv
            S = S - P
        else:
            S = S + kv
        z = z + k[:, i]
        numerator = torch.einsum("bhd,bhde->bhe", q[:, i], S)
        out.append(numerator / ((q[:, i] * z).sum(-1, keepdim=True) + EPS))
    return layer.proj(torch.stack(out, 1).reshape(b, length, c))


@pytest.mark.parametrize("kind,mu,stepsize", KINDS + [("adaptive_momentum", 0.6, 0.9)])
def test_parallel_form_is_the_literal_recurrence_at_every_position(kind, mu, stepsize):
    torch.manual_seed(0)
    delta = 0.05 if kind == "adaptive_momentum" else None
    layer = LinearAttention(config(kind, mu, stepsize, **({"delta": delta} if delta else {})))
    layer.eval()
    x = torch.randn(2, 2 * CHUNK + 21, 32)  # three chunks, the last one partial
    with torch.no_grad():
        expected = literal_recurrence(layer, x, mu, stepsize, kind != "linear", delta)
        torch.testing.assert_close(layer(x), expected, atol=2e-5, rtol=1e-4)


def with_random_residual_maps(model):
    """--is_resw's maps start as the identity: move them, so that the tests exercise them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "residual_weight" in name or "velocity_weight" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_recurrent_steps_and_chunked_prompts_match_the_parallel_forward_over_chunks(option):
    torch.manual_seed(0)
    model = with_random_residual_maps(GPT(config(grid=(10, 20), **option)).eval())  # 4 chunks
    codes = torch.randint(16, (2, 200))
    with torch.no_grad():
        full, _ = model(codes)
        inputs = model._inputs(codes)
        cache = model.new_cache(2)  # a 70-token prompt, one of 80, then single steps
        parts = [model.forward_cached(inputs[:, :70], cache, 0),
                 model.forward_cached(inputs[:, 70:150], cache, 70)]
        parts += [model.forward_cached(inputs[:, t:t + 1], cache, t) for t in range(150, 200)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("option", [OPTIONS[3], OPTIONS[5], OPTIONS[7]], ids=option_id)
def test_sampling_with_and_without_the_recurrent_state_draws_the_same_codes(option):
    """The sampler's own steps (model.step on the kind's cache) against re-running the whole
    prefix at every step."""
    torch.manual_seed(0)
    model = with_random_residual_maps(GPT(config(**option)).eval())
    a = model.sample(4, generator=torch.Generator().manual_seed(1))
    b = sample_without_cache(model, 4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 4, 5) and torch.equal(a, b)


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_momentum_residual_is_the_velocity_recurrence_across_layers(adaptive):
    """v_l = mu_l v_{l-1} - A_l, x = x - s v_l, then the MLP; mu_l = --res_mu, or from the
    change of the attention output relative to the velocity (--adaptive_type nc)."""
    torch.manual_seed(0)
    settings = ({"adaptive_type": "nc", "res_delta": 0.2} if adaptive else {"res_mu": 0.3})
    model = GPT(config("momentum", n_layer=3, res_stepsize=0.8, **settings)).eval()
    hidden = model.hidden_states(torch.randint(16, (2, 4, 5)))
    with torch.no_grad():
        x, velocity, attended_before = hidden[0], None, None
        for layer, block in enumerate(model.blocks):
            attended = block.attn(block.ln1(x))
            if velocity is None:
                velocity = -attended
            else:
                if adaptive:
                    ratio = ((attended - attended_before).norm(dim=-1, keepdim=True)
                             / velocity.norm(dim=-1, keepdim=True))
                    mu = ((1 - ratio.sqrt()) ** 2).clamp(0, 0.8)
                    assert 0 < mu.min() and mu.max() < 0.8  # computed, not all clamped
                else:
                    mu = 0.3
                velocity = mu * velocity - attended
            attended_before = attended
            x = x - 0.8 * velocity
            x = x + block.mlp(block.ln2(x))
            torch.testing.assert_close(hidden[layer + 1], x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "linear", "momentum"])
def test_a_checkpoint_from_before_the_momentum_options_loads_with_the_plain_residual(
        kind, tmp_path):
    """An old checkpoint's config has none of the new fields: the defaults rebuild the model it
    was (plain blocks, the same weights, strict loading) and its outputs: x + A(ln1 x), then
    x + mlp(ln2 x) at every layer."""
    torch.manual_seed(0)
    model = GPT(config(kind)).eval()
    old_config = {k: v for k, v in asdict(model.config).items() if k not in NEW_FIELDS}
    path = tmp_path / "old.pt"
    save_checkpoint({"kind": "prior", "family": "gpt", "config": old_config,
                     "model": model.state_dict()}, path)
    loaded = priors.from_checkpoint(load_checkpoint(path, "prior"))
    assert all(type(block) is Block for block in loaded.blocks)
    assert not loaded.config.momentum_residual and loaded.config.delta == 1e-4
    tokens = torch.randint(16, (2, 4, 5))
    hidden = loaded.hidden_states(tokens)
    with torch.no_grad():
        x = hidden[0]
        for layer, block in enumerate(loaded.blocks):
            x = x + block.attn(block.ln1(x))
            x = x + block.mlp(block.ln2(x))
            torch.testing.assert_close(hidden[layer + 1], x, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], atol=0, rtol=0)


def test_the_seed_flags_are_flags_of_train_py():
    parser = argparse.ArgumentParser()
    add_flags(parser, GPTConfig)
    argv = ("--attention adaptive_momentum --stepsize 0.9 --delta 0.001 --res_stepsize 0.99 "
            "--adaptive_type nc --res_delta 0.01 --is_resw").split()
    settings = build(GPTConfig, given(parser.parse_args(argv), GPTConfig))
    assert (settings.attention, settings.stepsize, settings.delta, settings.res_stepsize,
            settings.adaptive_type, settings.res_delta, settings.is_resw) == (
        "adaptive_momentum", 0.9, 0.001, 0.99, "nc", 0.01, True)
    model = GPT(config(**{k: getattr(settings, k) for k in ("attention", "stepsize", "delta",
                                                            "res_stepsize", "adaptive_type",
                                                            "res_delta", "is_resw")}))
    assert all(isinstance(block, MomentumBlock) for block in model.blocks)
    assert "blocks.0.residual_weight.weight" in model.state_dict()


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
    # adaptive momentum adds the last phi(k) and v; the momentum residual adds nothing
    small = GPT(config("adaptive_momentum", grid=(4, 4), res_mu=0.5)).new_cache(3)
    large = GPT(config("adaptive_momentum", grid=(32, 96), res_mu=0.5)).new_cache(3)
    assert small.nbytes == large.nbytes == 2 * 3 * 2 * (2 * 16 * 16 + 3 * 16) * 4


def test_linear_attention_settings_are_checked():
    with pytest.raises(UserError, match="--window_size works with --attention softmax only"):
        GPT(config("linear", window_size=1))
    with pytest.raises(UserError, match="--attention must be one of softmax, linear, momentum"):
        GPT(config("performer"))
    with pytest.raises(UserError, match=r"--mu must be in \[0, 1\)"):
        GPT(config("momentum", mu=1.0))


@pytest.mark.parametrize("settings,message", [
    ({"attention": "momentum", "adaptive_type": "wang"}, "--adaptive_type must be one of none, nc"),
    ({"adaptive_type": "nc", "res_mu": 0.1}, "computes the residual connection's momentum itself"),
    ({"res_mu": 1.0}, r"--res_mu must be in \[0, 1\)"),
    ({"res_stepsize": 0.0}, "--res_stepsize positive"),
    ({"attention": "momentum", "delta": 0.01}, "--delta is adaptive_momentum attention's"),
    ({"attention": "adaptive_momentum", "delta": 0.0},
     r"--delta and --res_delta must be in \(0, 1\)"),
    ({"res_mu": 0.2, "res_delta": 0.01}, "--res_delta bounds the momentum of --adaptive_type nc"),
    ({"attention": "adaptive_momentum", "window_size": 1},
     "--window_size works with --attention softmax only"),
])
def test_bad_momentum_settings_are_one_line_user_errors(settings, message):
    with pytest.raises(UserError, match=message) as error:
        GPT(config(**{"attention": "linear", **settings}))
    assert "\n" not in str(error.value)


def test_hidden_states_are_the_residual_stream_of_every_layer():
    torch.manual_seed(0)
    model = GPT(config("linear")).eval()
    tokens = torch.randint(16, (3, 4, 5))
    hidden = model.hidden_states(tokens)
    assert len(hidden) == 3 and all(h.shape == (3, 20, 32) for h in hidden)
    out, _ = model(tokens)  # the head reads the last layer's stream
    torch.testing.assert_close(model.head_proj(model.ln_f(hidden[-1])), out)
