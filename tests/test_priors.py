"""The prior interface on its own: heads, exact likelihoods, labels and guidance, completion,
the weight average. Tiny models on the CPU, no MLflow."""

import itertools
import math

import pytest
import torch

from core.errors import UserError
from pipeline.train_loop import WeightAverage
from pipeline.train_prior import evaluate
from priors.dropout import Dropout
from priors.heads import MixtureHead
from transformer.gpt import GPT, GPTConfig


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    settings = dict(vocab_size=8, grid_h=3, grid_w=4, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPT(GPTConfig(**{**settings, **overrides})).eval()


@pytest.mark.parametrize("channels", [1, 3])
def test_mixture_probabilities_sum_to_one_over_every_value(channels):
    torch.manual_seed(0)
    head = MixtureHead(vocab_size=5, mixtures=3, channels=channels)
    out = torch.randn(4, head.out_dim) * 3  # wide and narrow components, edge bins included
    values = torch.tensor(list(itertools.product(range(5), repeat=channels)))  # every pixel
    log_p = -head.nll(out[:, None].expand(-1, len(values), -1), values.expand(4, -1, -1))
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(4))


def test_mixture_draws_channels_from_the_exact_conditionals():
    """Channel-by-channel log-probs used for sampling multiply to the joint nll."""
    torch.manual_seed(1)
    head = MixtureHead(vocab_size=6, mixtures=4, channels=3)
    out = torch.randn(2, head.out_dim)
    pixel = torch.tensor([[0, 5, 2], [3, 3, 1]])
    state, total = head.begin(out), torch.zeros(2)
    for c in range(3):
        total += head.log_probs(out, state, c).gather(1, pixel[:, c:c + 1])[:, 0]
        state = head.observe(out, state, c, pixel[:, c])
    torch.testing.assert_close(total, -head.nll(out, pixel))


def test_mixture_edge_bins_take_the_tails():
    head = MixtureHead(vocab_size=4, mixtures=1)
    far_right = torch.tensor([[0.0, 50.0, 0.0]])  # logit, mean far above 1, log-scale 0
    assert head.nll(far_right, torch.tensor([[3]])).item() < 1e-6  # all mass in the top bin


def test_gpt_nll_is_the_sum_of_its_one_token_at_a_time_log_probabilities():
    model = tiny_gpt()
    tokens = torch.randint(8, (2, 3, 4))
    cache = model.new_cache(2)
    previous = torch.full((2, 1), model.start_token)
    expected = torch.zeros(2)
    for t in range(12):
        logits = model.forward_cached(previous, cache, t)[:, -1]
        expected += -logits.log_softmax(-1).gather(1, tokens.view(2, -1)[:, t:t + 1])[:, 0]
        previous = tokens.view(2, -1)[:, t:t + 1]
    torch.testing.assert_close(model.nll(tokens), expected, atol=1e-4, rtol=1e-5)
    out, loss = model(tokens)
    torch.testing.assert_close(loss, expected.sum() / 24, atol=1e-5, rtol=1e-5)


def test_cpu_dropout_keeps_one_minus_p_scaled_and_passes_gradient_through_the_mask():
    torch.manual_seed(0)
    layer = Dropout(0.3)
    x = torch.full((200, 500), 2.0, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 100,000 draws: sd 0.0015
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / 0.7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_weight_average_starts_from_the_weights_not_from_zero():
    model = torch.nn.Linear(3, 2)
    start = model.weight.detach().clone()
    average = WeightAverage(model, decay=0.999)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model, step=10 ** 6)  # past the warm-up: the decay is 0.999
    # decay * w0 + (1 - decay) * w1: an average started at zero would be ~0.001 * w1
    torch.testing.assert_close(average.model.weight, start + 0.001)


def test_a_label_reaches_every_position_and_null_differs():
    model = tiny_gpt(num_classes=3, window_size=0)  # a window of 0: no token sees another
    tokens = torch.randint(8, (1, 3, 4))
    outs = [model(tokens, torch.tensor([label]))[0] for label in (0, 1, 3)]  # 3 = null
    for a, b in itertools.combinations(outs, 2):
        assert (a - b).abs().amax(-1).min() > 1e-4  # every position moved


def test_labels_are_refused_by_an_unconditional_prior():
    with pytest.raises(UserError, match="trained without --conditional"):
        tiny_gpt().sample(2, labels=torch.tensor([0, 1]))
    with pytest.raises(UserError, match="--guidance needs a prior trained with --conditional"):
        tiny_gpt().sample(2, guidance=2.0)


def test_guidance_zero_is_unconditional_and_one_is_conditional():
    model = tiny_gpt(num_classes=3)
    labels = torch.tensor([1, 2, 0])
    draw = lambda **kw: model.sample(3, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(draw(labels=labels, guidance=0.0), draw())  # null label
    assert torch.equal(draw(labels=labels, guidance=1.0), draw(labels=labels))
    assert not torch.equal(draw(labels=labels, guidance=4.0), draw(labels=labels))


def test_completion_keeps_a_raster_prefix_bit_for_bit_and_refuses_other_masks():
    model = tiny_gpt()
    known = torch.randint(8, (4, 3, 4))
    mask = torch.zeros(4, 3, 4, dtype=torch.bool)
    mask[:, 0] = True
    mask[1, 1, :2] = True  # prefixes of different lengths per image are fine
    drawn = model.sample(4, known=known, known_mask=mask,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn[mask], known[mask])
    assert not torch.equal(drawn[~mask], known[~mask])
    left = torch.zeros(4, 3, 4, dtype=torch.bool)
    left[:, :, :2] = True
    with pytest.raises(UserError, match="raster prefix only"):
        model.sample(4, known=known, known_mask=left)


def test_mixture_head_on_the_gpt_scores_every_value_exactly():
    model = tiny_gpt(head="mixture", mixtures=3, ordered=True)
    tokens = torch.randint(8, (2, 3, 4))
    out, loss = model(tokens)
    assert out.shape == (2, 12, 9)  # 3 components x (weight, mean, log-scale), one value each
    samples = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, 4) and samples.max() < 8
    with pytest.raises(UserError, match="needs ordered tokens"):
        tiny_gpt(head="mixture")


def test_trained_gpt_stays_above_the_entropy_of_a_known_distribution():
    """A toy source with a known entropy: each row repeats one random value, so a grid of 2
    rows x 3 columns over 4 values carries exactly 2 * log(4) nats. No model can score held-out
    grids below it (up to sampling noise of the held-out set)."""
    generator = torch.Generator().manual_seed(0)
    def draw(n):
        return torch.randint(4, (n, 2, 1), generator=generator).expand(n, 2, 3).contiguous()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4, grid_h=2, grid_w=3, n_layer=1, n_head=2, n_embd=32,
                          dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = draw(256)
    for _ in range(150):
        _, loss = model(data[torch.randint(256, (64,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    heldout = draw(4000)
    nll = evaluate(model, heldout, None, torch.device("cpu"))
    entropy = 2 * math.log(4)
    assert nll < entropy + 0.1  # it learned the structure (uniform would be 6 log 4)
    assert nll > entropy - 0.05  # and cannot beat the source (noise of 4000 grids: ~0.02)


def test_conditional_training_makes_samples_follow_a_label_that_determines_the_image():
    """Class c's grids are the constant c + noise-free: after training, samples drawn for a
    class are that class's grid (with guidance and without)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=6, grid_h=2, grid_w=3, n_layer=1, n_head=2, n_embd=32,
                          dropout=0.0, num_classes=3, label_dropout=0.2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        labels = torch.randint(3, (32,))
        tokens = (2 * labels)[:, None, None].expand(32, 2, 3)  # class c -> every token 2c
        _, loss = model(tokens, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    wanted = torch.tensor([0, 1, 2, 2, 1, 0])
    for guidance in (None, 3.0):
        drawn = model.sample(6, labels=wanted, guidance=guidance,
                             generator=torch.Generator().manual_seed(0))
        assert torch.equal(drawn, (2 * wanted)[:, None, None].expand(6, 2, 3))
