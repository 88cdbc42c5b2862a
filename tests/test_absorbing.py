"""The absorbing-diffusion prior: the interface, both samplers' promises (steps, reveals, kept
tokens), the ELBO against its exact sum, a toy distribution with a known optimum, labels, larger
grids, and the scripts end to end on the chain's VQ codes."""

import dataclasses
import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import priors
import train as train_prior_script
import transformer_generation
from conftest import TINY_PRIOR, run_main
from pipeline import tracking
from pipeline.__main__ import main as pipeline_main
from pipeline.codes import load_run_codes
from core.errors import UserError
from pipeline.evaluate import image_nll
from pipeline.runs import load_run_checkpoint
from test_bad_input import cli_error
from transformer.absorbing import (IMPORTANCE_WARMUP, Absorbing, AbsorbingConfig, Predictor,
                                   nearest_window, reveal_subset, stride_times, window_starts)

SAMPLERS = ("absorbing", "maskgit")


def tiny(**overrides):
    torch.manual_seed(0)
    settings = dict(vocab_size=8, grid_h=3, grid_w=4, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return Absorbing(AbsorbingConfig(**{**settings, **overrides})).eval()


def record_inputs(model):
    """Every network evaluation's input grid (the token embedding runs once per evaluation)."""
    seen = []
    model.token_embedding.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    return seen


def train(model, make_batch, steps, lr=3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        _, loss = model(*make_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_the_interface_is_honoured():
    model = priors.build("absorbing", {"vocab_size": 8, "grid_h": 3, "grid_w": 4, "n_layer": 1,
                                       "n_head": 2, "n_embd": 16})
    assert model.family == "absorbing" and model.nll_is_bound
    tokens = torch.randint(8, (5, 3, 4))
    out, loss = model(tokens)
    assert out.shape == (5, 12, 8) and loss.ndim == 0 and loss > 0
    nll = model.nll(tokens, generator=torch.Generator().manual_seed(0))
    assert nll.shape == (5,) and (nll >= 0).all()
    for sampler in SAMPLERS:
        drawn = model.eval().sample(3, steps=4, sampler=sampler)
        assert drawn.shape == (3, 3, 4) and drawn.min() >= 0 and drawn.max() < 8


def test_reveal_subset_picks_each_masked_position_with_probability_one_over_t():
    masked = torch.zeros(4000, 12, dtype=torch.bool)
    masked[:, :10] = True  # m = 10 masked positions, t = 4: reveal 2 or 3, 2.5 on average
    reveal = reveal_subset(masked, 4, torch.Generator().manual_seed(0))
    counts = reveal.sum(1)
    assert set(counts.tolist()) == {2, 3}
    assert not reveal[:, 10:].any()  # only masked positions
    assert abs(counts.float().mean().item() - 2.5) < 0.05  # sd of the mean: 0.008
    assert (reveal[:, :10].float().mean(0) - 0.25).abs().max() < 0.03  # every position 1/t


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_finishes_in_exactly_s_steps_revealing_at_least_one_token_per_step(sampler):
    model = tiny()
    seen = record_inputs(model)
    for steps in (1, 5, 12):
        seen.clear()
        drawn = model.sample(6, steps=steps, sampler=sampler,
                             generator=torch.Generator().manual_seed(steps))
        assert len(seen) == steps  # network evaluations
        masked = torch.stack([(x == model.mask_token).sum(1) for x in seen])  # (steps, 6)
        assert (masked[0] == 12).all()
        assert (masked[1:] < masked[:-1]).all()  # every step revealed at least one token
        assert drawn.max() < 8  # and the last step revealed the rest


def test_the_default_is_maskgit_with_its_cosine_stride_as_the_docs_say():
    """Unset settings draw what maskgit with the cosine stride and choice temperature 4.5 draws
    (the default chosen in docs/absorbing.md, whose flag table says so); the absorbing sampler
    keeps its own default stride, magic."""
    model = tiny()
    draw = lambda **settings: model.sample(5, steps=6, generator=torch.Generator().manual_seed(3),
                                           **settings)
    assert torch.equal(draw(), draw(sampler="maskgit", stride="cosine", choice_temperature=4.5))
    assert torch.equal(draw(sampler="absorbing"), draw(sampler="absorbing", stride="magic"))
    assert not torch.equal(draw(), draw(sampler="absorbing"))
    docs = (Path(__file__).parents[1] / "docs" / "absorbing.md").read_text()
    defaults = [line for line in docs.splitlines()
                if line.startswith("| `--sampler ") and "(default" in line]
    assert len(defaults) == 1 and defaults[0].startswith("| `--sampler maskgit`")
    stride_row = next(line for line in docs.splitlines() if line.startswith("| `--stride NAME`"))
    assert "`cosine` (maskgit's default" in stride_row and "the default sampler" in stride_row


def test_stride_times_are_the_seeds_lists():
    """Times of the network calls for n = 16 tokens (module docstring, Strides)."""
    assert stride_times("magic", 8, 16) == [8, 7, 6, 5, 4, 3, 2, 1]
    assert stride_times("magic", None, 16) == list(range(16, 0, -1))
    assert stride_times("all", None, 16) == list(range(16, 0, -1))
    assert stride_times("even", 8, 16) == [16, 13, 11, 9, 7, 5, 3, 1]  # floor(linspace(1, 16, 8))
    assert stride_times("even", 1, 16) == [1]
    assert stride_times("quadratic", 4, 16) == [16, 9, 4, 1]
    assert stride_times("quadratic", None, 16) == [16, 9, 4, 1]  # isqrt(16) calls
    assert stride_times("cosine", 2, 16) == [1.0, math.cos(math.pi / 4)]
    assert stride_times("1,2,4,9", None, 16) == [16, 15, 13, 9]  # what is still masked
    assert stride_times("magic", 20, 5) == [5, 4, 3, 2, 1]  # no more calls than tokens
    assert stride_times("even", 8, 0) == []


STRIDE_CALLS = {"magic": lambda steps, n: steps, "even": lambda steps, n: steps,
                "quadratic": lambda steps, n: steps, "cosine": lambda steps, n: steps,
                "all": lambda steps, n: n}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_stride_makes_exactly_its_network_calls(sampler):
    """On the trained 3x4 grid and on a 5x7 grid (windows, one batch per call): every named
    stride at several --steps, and lists, whose calls reveal exactly the counts listed."""
    model = tiny()
    seen = record_inputs(model)
    cases = [((3, 4), stride, steps) for stride in STRIDE_CALLS for steps in (1, 5, 12)
             if stride != "all" or steps == 1]
    cases += [((5, 7), stride, 8) for stride in STRIDE_CALLS if stride != "all"]
    for (height, width), stride, steps in cases:
        n = height * width
        seen.clear()
        drawn = model.sample(3, steps=None if stride == "all" else steps, stride=stride,
                             sampler=sampler, grid_h=height, grid_w=width,
                             generator=torch.Generator().manual_seed(steps))
        assert len(seen) == STRIDE_CALLS[stride](steps, n), (stride, steps, n)
        assert (seen[0] == model.mask_token).all() and drawn.max() < 8  # all masked, all drawn
        if n == 12:  # (a larger grid's windows overlap)
            masked = torch.stack([(x == model.mask_token).sum(1) for x in seen])  # (calls, 3)
            assert (masked[1:] < masked[:-1]).all(), (stride, steps)  # each call reveals
    for counts in ([1, 2, 4, 5], [12], [6, 1, 1, 1, 1, 1, 1]):
        seen.clear()
        model.sample(4, stride=",".join(map(str, counts)), sampler=sampler,
                     generator=torch.Generator().manual_seed(0))
        still_masked = [int((x[0] == model.mask_token).sum()) for x in seen]
        assert still_masked == [12 - sum(counts[:i]) for i in range(len(counts))]


def test_strides_reveal_their_schedule_on_average():
    """The absorbing sampler reveals m (t_i - t_(i+1)) / t_i of the m masked tokens at call i,
    by randomised rounding: on a fresh grid of n tokens, about n t_(i+1) / t_1 stay masked."""
    model = tiny(vocab_size=4, grid_h=4, grid_w=5)  # n = 20
    seen = record_inputs(model)
    model.sample(2000, sampler="absorbing", stride="quadratic", steps=4,
                 generator=torch.Generator().manual_seed(0))
    mean_masked = [(x == model.mask_token).sum(1).float().mean().item() for x in seen]
    expected = [20 * t / 16 for t in (16, 9, 4, 1)]  # 20, 11.25, 5, 1.25
    assert all(abs(a - b) < 0.1 for a, b in zip(mean_masked, expected)), mean_masked


def test_the_fixed_mask_schedule_masks_exactly_its_share():
    model = tiny(timesteps=4)  # 12 tokens, T = 4: round(12 t / 4) = 3, 6, 9 or 12 masked
    tokens = torch.randint(8, (4000, 12))
    generator = torch.Generator().manual_seed(0)
    t, masked = model.corrupt(tokens, generator, schedule="fixed")
    assert torch.equal(masked.sum(1), 3 * t)
    for time in range(1, 5):  # at uniformly random positions
        share = masked[t == time].float().mean(0)
        assert (share - time / 4).abs().max() < 0.06
    t, masked = model.corrupt(tokens, generator)  # random: each token with probability t/4
    assert not torch.equal(masked.sum(1), 3 * t)
    assert abs(masked.float().mean().item() - (t / 4).mean().item()) < 0.01
    assert tiny(timesteps=40).corrupt(tokens, generator, torch.full((4000,), 1),
                                      "fixed")[1].sum(1).eq(1).all()  # round(0.3): at least 1
    fixed = tiny(timesteps=4, mask_schedule="fixed").train()
    seen = record_inputs(fixed)
    fixed(torch.randint(8, (64, 3, 4)))
    assert set(((seen[0] == fixed.mask_token).sum(1)).tolist()) <= {3, 6, 9, 12}


def test_importance_sampling_follows_the_history_and_keeps_the_objective():
    model = tiny(time_sampling="importance").train()  # T = 12
    tokens = torch.randint(8, (32, 3, 4))
    assert model.training_times(5, "cpu")[1] is None  # uniform during the warm-up
    while not model.importance_ready():
        model(tokens)
    assert model.loss_count[0] == 0 and (model.loss_count[1:] >= IMPORTANCE_WARMUP).all()
    assert (model.loss_sq_history[1:] > 0).all()

    # a known history: times are drawn in proportion to sqrt(E[L_t^2]) + 1e-4, weighted 1/(T p)
    history = torch.arange(13.0) ** 2  # E[L_t^2] = t^2: p(t) about t / 78
    model.loss_sq_history.copy_(history)
    torch.manual_seed(0)
    t, weight = model.training_times(200000, "cpu")
    p = (history[1:].sqrt() + 1e-4) / (history[1:].sqrt() + 1e-4).sum()
    frequency = torch.bincount(t, minlength=13)[1:] / len(t)
    assert (frequency - p).abs().max() < 0.005  # sd at most 0.001
    assert torch.allclose(weight, 1 / (12 * p[t - 1]))
    # unbiased: the weighted mean of any per-t loss under p is its mean under uniform times
    loss_at = torch.rand(13, generator=torch.Generator().manual_seed(1)) * 5
    estimate = (weight * loss_at[t]).mean()
    assert abs(estimate.item() - loss_at[1:].mean().item()) < 0.02 * loss_at[1:].mean().item()

    # forward: the loss is the weighted mean, and eval mode neither samples nor records
    count = model.loss_count.clone()
    model.eval()
    assert model.training_times(5, "cpu")[1] is None
    model(tokens)
    assert torch.equal(model.loss_count, count)
    model.train()
    model(tokens)
    assert model.loss_count.sum() == count.sum() + 32


def test_a_checkpoint_without_the_new_fields_loads_and_trains_as_before():
    """Configs written before --mask_schedule and --time_sampling: the defaults, no buffers,
    the same loss draw for draw; the importance history is in a new model's state dict."""
    model = tiny(num_classes=3)
    old_config = {k: v for k, v in dataclasses.asdict(model.config).items()
                  if k not in ("mask_schedule", "time_sampling")}
    checkpoint = {"family": "absorbing", "config": old_config, "model": model.state_dict()}
    loaded = priors.from_checkpoint(checkpoint).train()
    assert (loaded.config.mask_schedule, loaded.config.time_sampling) == ("random", "uniform")
    assert not any(name.startswith("loss_") for name, _ in loaded.named_buffers())
    tokens, labels = torch.randint(8, (16, 3, 4)), torch.randint(3, (16,))
    torch.manual_seed(2)
    expected = model.train()(tokens, labels)[1]
    torch.manual_seed(2)
    assert torch.equal(loaded(tokens, labels)[1], expected)
    importance = tiny(time_sampling="importance")
    assert {"loss_sq_history", "loss_count"} <= set(importance.state_dict())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_completion_keeps_any_mask_bit_for_bit(sampler):
    model = tiny(num_classes=3)
    generator = torch.Generator().manual_seed(1)
    known = torch.randint(8, (6, 3, 4), generator=generator)
    keep = torch.rand(6, 3, 4, generator=generator) < 0.5
    keep[0] = False
    keep[1] = True  # nothing to draw for this one
    keep[2] = torch.tensor([[0, 1, 0, 1]] * 3, dtype=torch.bool)  # columns: no raster prefix
    drawn = model.sample(6, labels=torch.tensor([0, 1, 2, 0, 1, 2]), known=known,
                         known_mask=keep, steps=12, guidance=2.0, sampler=sampler,
                         generator=generator)
    assert torch.equal(drawn[keep], known[keep])
    assert drawn.max() < 8 and not torch.equal(drawn[~keep], known[~keep])


def test_monte_carlo_elbo_matches_the_exact_sum_over_every_t_and_mask():
    """2x2 tokens, 3 values, T = 4: the bound sum_t E_mask[(1/t) sum_masked -log p] has 4 x 16
    terms. The mean of one-draw estimates must match it (and the `elbo` loss, per token)."""
    torch.manual_seed(0)
    model = Absorbing(AbsorbingConfig(vocab_size=3, grid_h=2, grid_w=2, n_layer=1, n_head=1,
                                      n_embd=8, dropout=0.0, loss="elbo")).eval()
    with torch.no_grad():  # sharp, mask-dependent predictions, so a wrong weighting shows
        for p in model.parameters():
            p.normal_(0, 1.0)
    x0 = torch.tensor([[2, 0, 1, 2]])
    steps, d = 4, 4
    exact = 0.0
    with torch.no_grad():
        for t in range(1, steps + 1):
            for subset in itertools.product([False, True], repeat=d):
                masked = torch.tensor([subset])
                k = int(masked.sum())
                probability = (t / steps) ** k * (1 - t / steps) ** (d - k)
                ce, _ = model._masked_ce(x0, None, torch.tensor([t]), masked)
                exact += probability * ce.sum().item() / t
        draws = model.nll(x0.expand(40000, d).reshape(40000, 2, 2),
                          generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        _, loss = model(x0.expand(40000, d).reshape(40000, 2, 2))
    error = draws.std().item() / math.sqrt(len(draws))
    assert error < 0.02 * exact  # precise enough to tell
    assert abs(draws.mean().item() - exact) < 4 * error
    assert abs(loss.item() * d - exact) < 4 * error


def test_trained_absorbing_bound_stays_above_the_entropy_and_the_best_possible_bound():
    """Each row of a 2x3 grid repeats one of 4 values: entropy 2 log 4. Revealing tokens
    independently, even a perfect model pays log 4 for every token of a row that is wholly
    masked, so the smallest possible expected bound is 2 * 3 log 4 * sum_t (1/t)(t/6)^3 =
    log 4 * 91/36 (> the entropy). A trained model lands near it, never below."""
    generator = torch.Generator().manual_seed(0)

    def draw(n):
        return torch.randint(4, (n, 2, 1), generator=generator).expand(n, 2, 3).contiguous()
    torch.manual_seed(0)
    model = Absorbing(AbsorbingConfig(vocab_size=4, grid_h=2, grid_w=3, n_layer=1, n_head=2,
                                      n_embd=32, dropout=0.0))
    data = draw(256)
    train(model, lambda: (data[torch.randint(256, (64,))],), 150)
    nll = image_nll(model, draw(4000), None, elbo_samples=4)
    error = nll.std().item() / math.sqrt(len(nll))
    entropy, best_bound = 2 * math.log(4), math.log(4) * 91 / 36
    assert nll.mean() > entropy
    assert nll.mean() > best_bound - 4 * error  # error ~0.035
    assert nll.mean() < best_bound + 0.25  # it learned the rows (uniform: 6 log 4 = 8.3)


def test_conditional_training_makes_both_samplers_follow_a_label_that_determines_the_image():
    """Class c's grids are every token = 2c. Tokens revealed together are drawn independently,
    so a model that puts 0.999 on the right value still slips about once in a thousand tokens:
    every image must be its class's grid by majority, and nearly every token exact."""
    torch.manual_seed(0)
    model = Absorbing(AbsorbingConfig(vocab_size=6, grid_h=2, grid_w=3, n_layer=1, n_head=2,
                                      n_embd=32, dropout=0.0, num_classes=3, label_dropout=0.2))

    def batch():
        labels = torch.randint(3, (32,))
        return (2 * labels)[:, None, None].expand(32, 2, 3), labels  # class c -> every token 2c
    train(model, batch, 200, lr=1e-2)
    wanted = torch.tensor([0, 1, 2, 2, 1, 0] * 4)
    for sampler, guidance in itertools.product(SAMPLERS, (None, 3.0)):
        drawn = model.sample(24, labels=wanted, guidance=guidance, steps=3, sampler=sampler,
                             generator=torch.Generator().manual_seed(0)).view(24, 6)
        assert torch.equal(drawn.mode(1).values, 2 * wanted), (sampler, guidance)
        assert (drawn == 2 * wanted[:, None]).float().mean() > 0.98, (sampler, guidance)


def test_a_larger_grid_takes_each_position_from_its_most_central_window():
    assert window_starts(9, 4) == [0, 2, 4, 5]  # stride 2, the last one flush with the edge
    # centres 1.5, 3.5, 5.5, 6.5; cell 2 is nearest 1.5, cell 6 ties (5.5, 6.5): the earlier
    assert nearest_window(9, 4, [0, 2, 4, 5]).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert window_starts(12, 6, unit=3) == [0, 3, 6]  # whole RGB pixels only
    model = tiny()  # a 3x4 grid, sampled as 5x7: row windows start at 0, 1, 2, columns 0, 2, 3
    predict = Predictor(model, 1, (5, 7), None, None, 1.0, None, None, torch.device("cpu"))
    tokens = torch.randint(9, (1, 35))  # mask tokens included
    hidden = predict._hidden(tokens)
    grid = tokens.view(5, 7)
    row_start, col_start = [0, 0, 1, 2, 2], [0, 0, 0, 2, 2, 3, 3]
    for row, col in itertools.product(range(5), range(7)):
        r0, c0 = row_start[row], col_start[col]
        window = model._hidden(grid[r0:r0 + 3, c0:c0 + 4].reshape(1, 12))
        assert torch.allclose(hidden[0, row * 7 + col],
                              window[0, (row - r0) * 4 + col - c0], atol=1e-5)
    seen = record_inputs(model)
    drawn = model.sample(2, steps=6, grid_h=5, grid_w=7)
    assert drawn.shape == (2, 5, 7) and drawn.max() < 8
    assert len(seen) == 6 and seen[0].shape == (2 * 9, 12)  # 3 x 3 windows per image


def test_bad_settings_are_one_line_errors():
    model = tiny()
    for kwargs, match in (({"steps": 0}, r"--steps must be in 1..12"),
                          ({"steps": 13}, r"--steps must be in 1..12"),
                          ({"sampler": "greedy"}, "--sampler must be one of absorbing, maskgit"),
                          ({"sampler": "absorbing", "choice_temperature": 2.0},
                           "--choice_temperature is for --sampler maskgit"),
                          ({"grid_h": 2}, "at least the trained grid"),
                          ({"window_size": 2}, "does not take --window_size"),
                          ({"stride": "linear"}, "--stride must be one of magic, all, even, "
                                                 "quadratic, cosine or a list of tokens per "
                                                 "network call such as 1,2,4,9, got 'linear'"),
                          ({"stride": "1,0,11"}, "--stride must be one of"),
                          ({"stride": "all", "steps": 4}, "--stride all calls the network once "
                                                          "per token: leave --steps unset"),
                          ({"stride": "3,9", "steps": 3}, "--steps 3 does not match --stride "
                                                          "3,9 \\(2 calls\\)"),
                          ({"stride": "1,2,4,8"}, "--stride 1,2,4,8 reveals 15 tokens, but a "
                                                  "3x4 grid has 12")):
        with pytest.raises(UserError, match=match):
            model.sample(1, **kwargs)
    with pytest.raises(UserError, match="softmax head only"):
        tiny(head="mixture", ordered=True)
    with pytest.raises(UserError, match="--loss must be one of"):
        tiny(loss="l2")
    with pytest.raises(UserError, match="--mask_schedule must be one of random, fixed"):
        tiny(mask_schedule="cosine")
    with pytest.raises(UserError, match="--time_sampling must be one of uniform, importance"):
        tiny(time_sampling="sqrt")


# through the scripts, on the chain's VQ codes (4x4 grid, 3 labels)

@pytest.fixture(scope="module")
def absorbing_prior(chain):
    return run_main(train_prior_script.main, ["--run_id", chain["vqvae"], "--prior", "absorbing",
                                              "--conditional", "--max_steps", "20",
                                              "--eval_every", "10", *TINY_PRIOR])


def test_scripts_train_generate_complete_and_evaluate(chain, absorbing_prior, tmp_path):
    run = tracking.client().get_run(absorbing_prior)
    assert run.data.tags[tracking.PRIOR_TAG] == "absorbing"
    assert "val/bits_per_dim" in run.data.metrics  # the bound, always logged
    for sampler in SAMPLERS:
        run_main(transformer_generation.main, [
            "--run_id", absorbing_prior, "--steps", "4", "--sampler", sampler, "--labels",
            "0,1,2", "--guidance", "2", "--name", sampler, "--out_dir", str(tmp_path / sampler)])
        record = tracking.load_json_artifact(absorbing_prior, f"generated/{sampler}.json")
        assert record["sampler"] == sampler and record["steps"] == 4
        assert Image.open(tmp_path / sampler / "sample_0002.png").size == (16, 16)
    run_main(transformer_generation.main, ["--run_id", absorbing_prior, "--stride", "1,3,12",
                                           "--num_samples", "2", "--name", "list", "--no_decode"])
    assert tracking.load_json_artifact(absorbing_prior, "generated/list.json")["stride"] == \
        "1,3,12"

    run_main(transformer_generation.main, ["--run_id", absorbing_prior, "--grid_h", "6",
                                           "--grid_w", "8", "--num_samples", "2", "--steps", "6",
                                           "--out_dir", str(tmp_path / "large")])
    assert Image.open(tmp_path / "large" / "sample_0001.png").size == (32, 24)  # 4 px per code

    run_main(transformer_generation.main, ["--run_id", absorbing_prior, "--complete",
                                           str(chain["csv"]), "--keep", "left", "--steps", "4",
                                           "--num_completions", "2", "--max_images", "3",
                                           "--name", "left", "--out_dir", str(tmp_path / "c")])
    codes, _ = load_run_codes(chain["vqvae"], "train")
    with tempfile.TemporaryDirectory() as tmp:
        drawn = np.load(tracking.download_artifact(absorbing_prior, "completions/left/codes.npy",
                                                   tmp))
    assert drawn.shape == (3, 2, 4, 4)
    assert (drawn[:, :, :, :2] == codes[:3, None, :, :2].numpy()).all()  # left half kept
    assert (tmp_path / "c" / "completions.png").is_file()

    run_main(pipeline_main, ["evaluate", "--run_id", absorbing_prior, "--path_to_data",
                             str(chain["csv"]), "--name", "heldout", "--elbo_samples", "2"])
    summary = tracking.load_json_artifact(absorbing_prior, "eval/heldout.json")
    assert summary["bound"] and summary["elbo_samples"] == 2
    assert 0 < summary["bits_per_dim"] < 16 * 4 / 256 * 3  # 16 codes of 4 bits, plus the gap


def test_importance_history_survives_a_resume_and_the_settings_are_recorded(chain):
    run_id = run_main(train_prior_script.main, [
        "--run_id", chain["vqvae"], "--prior", "absorbing", "--time_sampling", "importance",
        "--mask_schedule", "fixed", "--max_steps", "4", "--eval_every", "4",
        "--checkpoint_every", "4", *TINY_PRIOR])
    first = load_run_checkpoint(run_id, "prior", "prior", prefer="last.pt")
    assert first["config"]["time_sampling"] == "importance"
    assert first["model"]["loss_count"].sum() == 4 * 16  # every image's time, batch 16
    run_main(train_prior_script.main, ["--resume_run_id", run_id, "--max_steps", "6"])
    resumed = load_run_checkpoint(run_id, "prior", "prior", prefer="last.pt")
    assert resumed["step"] == 6 and resumed["model"]["loss_count"].sum() == 6 * 16
    params = tracking.client().get_run(run_id).data.params
    assert (params["time_sampling"], params["mask_schedule"]) == ("importance", "fixed")


def test_script_errors(chain, absorbing_prior, capsys):
    for flags, message in ((["--steps", "0"], "--steps must be in 1..16"),
                           (["--steps", "17"], "--steps must be in 1..16"),
                           (["--sampler", "greedy"], "--sampler must be one of absorbing, maskgit"),
                           (["--grid_w", "3"], "at least the trained grid"),
                           (["--stride", "1,2"], "--stride 1,2 reveals 3 tokens, but a 4x4 grid "
                                                 "has 16"),
                           (["--stride", "squares"], "--stride must be one of")):
        assert message in cli_error(transformer_generation.main,
                                    ["--run_id", absorbing_prior, "--no_decode", *flags], capsys)
    assert "the absorbing prior has a softmax head only" in cli_error(
        train_prior_script.main, ["--run_id", chain["vqvae"], "--prior", "absorbing", "--head",
                                  "mixture", *TINY_PRIOR], capsys)
    assert "--loss must be one of" in cli_error(
        train_prior_script.main, ["--run_id", chain["vqvae"], "--prior", "absorbing", "--loss",
                                  "l1", *TINY_PRIOR], capsys)
