"""The absorbing-diffusion prior: the interface, both samplers' promises (steps, reveals, kept
tokens), the ELBO against its exact sum, a toy distribution with a known optimum, labels, larger
grids, and the scripts end to end on the chain's VQ codes."""

import itertools
import math
import tempfile

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
from test_bad_input import cli_error
from transformer.absorbing import (Absorbing, AbsorbingConfig, Predictor, nearest_window,
                                   reveal_subset, window_starts)

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
                          ({"choice_temperature": 2.0}, "--choice_temperature is for --sampler "
                                                        "maskgit"),
                          ({"grid_h": 2}, "at least the trained grid"),
                          ({"window_size": 2}, "does not take --window_size")):
        with pytest.raises(UserError, match=match):
            model.sample(1, **kwargs)
    with pytest.raises(UserError, match="softmax head only"):
        tiny(head="mixture", ordered=True)
    with pytest.raises(UserError, match="--loss must be one of"):
        tiny(loss="l2")


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


def test_script_errors(chain, absorbing_prior, capsys):
    for flags, message in ((["--steps", "0"], "--steps must be in 1..16"),
                           (["--steps", "17"], "--steps must be in 1..16"),
                           (["--sampler", "greedy"], "--sampler must be one of absorbing, maskgit"),
                           (["--grid_w", "3"], "at least the trained grid")):
        assert message in cli_error(transformer_generation.main,
                                    ["--run_id", absorbing_prior, "--no_decode", *flags], capsys)
    assert "the absorbing prior has a softmax head only" in cli_error(
        train_prior_script.main, ["--run_id", chain["vqvae"], "--prior", "absorbing", "--head",
                                  "mixture", *TINY_PRIOR], capsys)
    assert "--loss must be one of" in cli_error(
        train_prior_script.main, ["--run_id", chain["vqvae"], "--prior", "absorbing", "--loss",
                                  "l1", *TINY_PRIOR], capsys)
