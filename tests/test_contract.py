"""The contract of the two model families, run on every registered member: every prior family
(priors.FAMILIES) and every tokenizer kind (image_tokenizers.KINDS), read from the registries
when the tests are collected, so a new family or kind is tested by adding its registry line.

Each model is its family's default `Config` with only the data fields set here (tiny grids), on
the CPU, seeded, untrained: the contract is about shapes, ranges, determinism, checkpoints,
completion and labels, not about quality.

Priors, per family and data combination (COMBOS): forward's loss, nll's shape and sign, the
checkpoint round trip, sampling (plain, completing a raster prefix, a non-prefix mask), labels
and guidance, and sampling leaving the weights alone. A family may refuse an optional
combination (RGB levels with one head or the other) with a UserError at construction: that
combination is skipped for that family only, and some family must take it.

Tokenizers, per kind and in_channels 1 and 3: what the tokens are (vocab, grid, values per
pixel), encode/decode shapes and ranges, the exact round trip where the kind is lossless, the
known-pixel masks, the checkpoint round trip, and how the kind is made (fitted or trained).
"""

import dataclasses

import pytest
import torch

import image_tokenizers
import priors
from core.config import build as build_config
from core.errors import UserError
from pipeline.checkpoint import load_checkpoint, save_checkpoint

PRIOR_FAMILIES = list(priors.FAMILIES)          # read at collection time
TOKENIZER_KINDS = list(image_tokenizers.KINDS)  # read at collection time


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: a second thread only adds synchronisation, and on a loaded machine
    oversubscribed threads make sampling a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ---------------------------------------------------------------------------------------------
# priors

VOCAB, GRID = 8, 4
CODES = dict(vocab_size=VOCAB, grid_h=GRID, grid_w=GRID, channels=1, ordered=False,
             num_classes=0)
RGB_LEVELS = dict(vocab_size=VOCAB, grid_h=GRID, grid_w=3 * GRID, channels=3, ordered=True)


def ordered_head(module):
    """The head a family's config picks for ordered tokens, through its own `head` field:
    `auto` where that is the default (it resolves to the mixture head), else `mixture`."""
    defaults = {f.name: f.default for f in dataclasses.fields(module.Config)}
    return "auto" if defaults.get("head") == "auto" else "mixture"


# name -> (data fields given the family's module, required). Every family must build the
# required ones; an optional one may be refused with a UserError (skipped for that family).
COMBOS = {
    "codes": (lambda module: CODES, True),
    "conditional": (lambda module: {**CODES, "num_classes": 3}, True),
    "rgb-mixture-conditional": (lambda module: {**RGB_LEVELS, "num_classes": 3,
                                                "head": ordered_head(module)}, False),
    "rgb-softmax": (lambda module: {**RGB_LEVELS, "num_classes": 0, "head": "softmax"}, False),
}

_built = {}


def build_prior(name, combo):
    """The family's model for a combination, built once per session, seeded, in eval mode;
    a UserError where the family refuses the combination."""
    if (name, combo) not in _built:
        fields, _ = COMBOS[combo]
        torch.manual_seed(0)
        try:
            model = priors.build(name, fields(priors.family(name))).eval()
        except UserError as e:
            model = e
        _built[name, combo] = model
    if isinstance(_built[name, combo], UserError):
        raise _built[name, combo]
    return _built[name, combo]


@pytest.fixture(params=[(name, combo) for name in PRIOR_FAMILIES for combo in COMBOS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def prior(request):
    name, combo = request.param
    try:
        model = build_prior(name, combo)
    except UserError as e:
        if COMBOS[combo][1]:
            raise  # every family takes the plain and the conditional codes
        pytest.skip(f"the {name} prior refuses {combo}: {e}")
    assert model.family == name, "a family's `family` must be its registry name"
    assert not model.training
    return model


def data(model, n=4, seed=0):
    """n token grids in [0, vocab) and n labels (None for an unconditional prior)."""
    config = model.config
    generator = seeded(seed)
    tokens = torch.randint(0, config.vocab_size, (n, config.grid_h, config.grid_w),
                           generator=generator)
    labels = (torch.randint(0, config.num_classes, (n,), generator=generator)
              if config.num_classes else None)
    return tokens, labels


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def nll(model, tokens, labels=None, seed=0):
    return model.nll(tokens, labels, generator=seeded(seed))


def assert_valid_tokens(sample, model, n):
    config = model.config
    assert sample.shape == (n, config.grid_h, config.grid_w)
    assert not sample.is_floating_point() and not sample.is_complex()
    assert 0 <= int(sample.min()) and int(sample.max()) < config.vocab_size


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_required_combinations_build_and_each_optional_one_builds_somewhere():
    """Skips are per family: every family builds the plain and the conditional codes, and every
    optional combination is built by at least one family (else it is refused for all)."""
    for combo, (_, required) in COMBOS.items():
        takers = []
        for name in PRIOR_FAMILIES:
            try:
                build_prior(name, combo)
                takers.append(name)
            except UserError as e:
                assert not required, f"the {name} prior refuses {combo}: {e}"
        assert takers, f"every family refuses {combo}"


def test_forward_returns_a_finite_scalar_loss_that_trains(prior):
    tokens, labels = data(prior)
    torch.manual_seed(0)
    prior.train()
    try:
        _, loss = prior(tokens, labels)
        assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
        loss.backward()
        grads = [p.grad for p in prior.parameters() if p.grad is not None]
        assert grads, "the loss reaches no parameter"
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    finally:
        prior.zero_grad(set_to_none=True)
        prior.eval()


def test_nll_is_finite_positive_nats_per_image(prior):
    tokens, labels = data(prior)
    values = nll(prior, tokens, labels)
    assert values.shape == (4,) and values.is_floating_point()
    assert torch.isfinite(values).all()
    assert (values >= 0).all()
    if prior.nll_is_bound:
        # one draw of the bound may mask nothing (0 nats); over draws every image costs some
        generator = seeded(1)
        mean = torch.stack([prior.nll(tokens, labels, generator=generator)
                            for _ in range(8)]).mean(0)
        assert (mean > 0).all()
        torch.testing.assert_close(values, nll(prior, tokens, labels))  # same generator
    else:
        assert (values > 0).all()
        # exact: no randomness, and one image's value does not depend on the batch
        torch.testing.assert_close(values, nll(prior, tokens, labels, seed=7))
        alone = prior.nll(tokens[1:2], labels[1:2] if labels is not None else None)
        torch.testing.assert_close(alone, values[1:2], rtol=1e-4, atol=1e-4)
        # the training objective is the same likelihood, in nats per token (eval mode: no
        # label dropout)
        _, loss = prior(tokens, labels)
        per_token = values.mean() / (prior.config.grid_h * prior.config.grid_w)
        torch.testing.assert_close(loss, per_token, rtol=1e-4, atol=1e-5)


def test_labels_are_taken_by_a_conditional_prior_and_refused_by_an_unconditional_one(prior):
    tokens, labels = data(prior, n=3)
    config = prior.config
    if config.num_classes:
        other = (labels + 1) % config.num_classes
        assert not torch.allclose(nll(prior, tokens, labels), nll(prior, tokens, other)), \
            "the labels do not change the likelihood"
        for guidance in (None, 2.0):
            assert_valid_tokens(prior.sample(3, labels=labels, guidance=guidance,
                                             generator=seeded()), prior, 3)
        assert_valid_tokens(prior.sample(3, generator=seeded()), prior, 3)  # the null label
        with pytest.raises(UserError):
            prior.sample(3, guidance=2.0, generator=seeded())  # guidance needs labels
    else:
        labels = torch.zeros(3, dtype=torch.long)
        with pytest.raises(UserError):
            prior.sample(3, labels=labels, generator=seeded())
        with pytest.raises(UserError):
            prior.sample(3, guidance=2.0, generator=seeded())
        with pytest.raises(UserError):
            prior.nll(tokens, labels, generator=seeded())


def test_an_option_the_family_does_not_take_is_refused(prior):
    with pytest.raises(UserError):
        prior.sample(1, not_a_sampling_option=1, generator=seeded())


def test_sample_gives_token_grids_reproducibly(prior):
    first = prior.sample(3, generator=seeded(5))
    assert_valid_tokens(first, prior, 3)
    assert torch.equal(prior.sample(3, generator=seeded(5)), first)


def test_on_step_sees_the_grid_fill_and_leaves_the_draw_alone(prior):
    """The per-step callback (GIFs of sampling): it starts with the kept tokens only, what is
    decided only grows, the last call is the returned grid, and watching changes nothing."""
    config = prior.config
    known, _ = data(prior, n=2, seed=3)
    mask = prefix_mask(config, n=2)
    plain = prior.sample(2, known=known, known_mask=mask, generator=seeded(4))
    calls = []
    watched = prior.sample(2, known=known, known_mask=mask, generator=seeded(4),
                           on_step=lambda tokens, decided: calls.append((tokens, decided)))
    assert torch.equal(watched, plain)
    assert len(calls) >= 2
    tokens, decided = calls[0]
    assert torch.equal(decided, mask) and torch.equal(tokens[mask], known[mask])
    counts = [int(d.sum()) for _, d in calls]
    assert counts == sorted(counts) and counts[0] < counts[1]
    tokens, decided = calls[-1]
    assert decided.all() and torch.equal(tokens, plain)


def test_an_on_step_that_raises_stops_sampling_between_steps(prior):
    """How a served model stops a call whose time is up: the callback raises, and no step runs
    after it."""
    calls = []

    class TimeUp(Exception):
        pass

    def stop_at_the_second_step(tokens, decided):
        calls.append(int(decided.sum()))
        if len(calls) == 2:
            raise TimeUp

    with pytest.raises(TimeUp):
        prior.sample(2, generator=seeded(), on_step=stop_at_the_second_step)
    assert len(calls) == 2 and calls[1] < 2 * prior.config.grid_h * prior.config.grid_w


def test_a_batch_of_blocks_with_their_own_generators_draws_what_each_draws_alone(prior):
    """priors.sampling.RowGenerators: requests with their own seeds in one batch (the served
    model) get exactly the tokens they get alone, labels and guidance included."""
    from priors.sampling import RowGenerators
    sizes, seeds = [2, 1, 3], [5, 6, 7]
    num_classes = prior.config.num_classes
    labels = [torch.full((n,), i % num_classes) if num_classes else None
              for i, n in enumerate(sizes)]
    extra = {"guidance": 2.0} if num_classes else {}  # guidance: the labelled, doubled batch
    if "steps" in {f.name for f in dataclasses.fields(priors.sampling_class(prior.family))}:
        extra["steps"] = 3  # a parallel decoder: several tokens a step, in fewer steps
    alone = [prior.sample(n, label, generator=seeded(seed), **extra)
             for n, label, seed in zip(sizes, labels, seeds)]
    together = prior.sample(sum(sizes), torch.cat(labels) if num_classes else None,
                            generator=RowGenerators([seeded(s) for s in seeds], sizes), **extra)
    assert torch.equal(together, torch.cat(alone))


def test_hidden_states_where_a_family_has_them(prior):
    """Per-layer features (Image GPT's probes): the stream at the input and after each block,
    (B, T, width) each, for families that have them."""
    if not hasattr(prior, "hidden_states"):
        pytest.skip(f"the {prior.family} prior has no per-layer features")
    tokens, _ = data(prior, n=3)
    hidden = prior.hidden_states(tokens)
    length = prior.config.grid_h * prior.config.grid_w
    assert len(hidden) == prior.config.n_layer + 1
    assert all(h.shape == (3, length, hidden[0].shape[-1]) for h in hidden)


def prefix_mask(config, n=3):
    """Raster prefixes, per image: the first row, the first two rows, the whole grid."""
    mask = torch.zeros(n, config.grid_h, config.grid_w, dtype=torch.bool)
    for i, rows in enumerate([1, 2, config.grid_h][:n]):
        mask[i, :rows] = True
    return mask


def test_sample_keeps_a_known_raster_prefix(prior):
    config = prior.config
    known, labels = data(prior, n=3, seed=1)
    mask = prefix_mask(config)
    guidance = 2.0 if config.num_classes else None
    out = prior.sample(3, labels=labels, known=known, known_mask=mask, guidance=guidance,
                       generator=seeded())
    assert_valid_tokens(out, prior, 3)
    assert torch.equal(out[mask], known[mask])
    assert torch.equal(out[2], known[2])


def test_a_mask_that_is_not_a_raster_prefix_is_kept_exactly_or_refused(prior):
    config = prior.config
    known, _ = data(prior, n=2, seed=2)
    pixels = config.grid_w // config.channels
    rows, cols = torch.meshgrid(torch.arange(config.grid_h), torch.arange(pixels), indexing="ij")
    board = ((rows + cols) % 2 == 0).repeat_interleave(config.channels, 1)  # whole pixels
    mask = torch.stack([board, ~board])  # each has a known token after a hidden one
    try:
        out = prior.sample(2, known=known, known_mask=mask, generator=seeded())
    except UserError:
        return  # refused: a raster family
    assert_valid_tokens(out, prior, 2)
    assert torch.equal(out[mask], known[mask]), "a known token was changed"


def test_checkpoint_round_trip_gives_the_same_nll_and_samples(prior, tmp_path):
    path = tmp_path / "prior.pt"
    save_checkpoint({"kind": "prior", "family": prior.family,
                     "config": dataclasses.asdict(prior.config), "model": prior.state_dict()},
                    path)
    loaded = priors.from_checkpoint(load_checkpoint(path, "prior"))
    assert type(loaded) is type(prior) and loaded.family == prior.family
    assert not loaded.training
    assert loaded.config == prior.config
    tokens, labels = data(prior)
    torch.testing.assert_close(nll(loaded, tokens, labels), nll(prior, tokens, labels),
                               rtol=0, atol=0)
    sample_labels = labels[:3] if labels is not None else None
    assert torch.equal(loaded.sample(3, labels=sample_labels, generator=seeded(3)),
                       prior.sample(3, labels=sample_labels, generator=seeded(3)))


def test_sampling_in_eval_mode_leaves_the_parameters_alone(prior):
    config = prior.config
    before = snapshot(prior)
    known, labels = data(prior, n=3, seed=4)
    prior.sample(3, labels=labels, generator=seeded())
    prior.sample(3, labels=labels, known=known, known_mask=prefix_mask(config),
                 guidance=2.0 if config.num_classes else None, generator=seeded())
    after = prior.state_dict()
    assert not prior.training
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"sampling changed {key}"


# ---------------------------------------------------------------------------------------------
# tokenizers

SIZE, BATCH = 16, 4


def images(in_channels, n=BATCH, seed=0):
    """Images in [0, 1], with 0 and 1 themselves (the ends of the range) among them."""
    x = torch.rand(n, in_channels, SIZE, SIZE, generator=seeded(seed))
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0
    return x


_tokenizers = {}


def build_tokenizer(name, in_channels):
    """A kind's model from its default Config with image_size and in_channels set: fitted on
    training images (a fitted kind) or freshly built (a kind trained by steps); eval mode."""
    if (name, in_channels) not in _tokenizers:
        module = image_tokenizers.kind(name)
        config = build_config(module.Config, {"image_size": SIZE, "in_channels": in_channels})
        torch.manual_seed(0)
        if module.Model.fitted:
            model = module.Model.fit(config, images(in_channels, n=8, seed=9), seed=0)
        else:
            model = image_tokenizers.build(name, dataclasses.asdict(config))
            # one training-mode forward, no optimizer step: the model has seen data (a VQ-VAE
            # initialises its codebook from the batch; untouched, it maps everything to one code)
            model.train()
            model(images(in_channels, n=8, seed=9))
        _tokenizers[name, in_channels] = model.eval()
    return _tokenizers[name, in_channels]


@pytest.fixture(params=[(name, c) for name in TOKENIZER_KINDS for c in (1, 3)],
                ids=lambda p: f"{p[0]}-c{p[1]}")
def tokenizer(request):
    return build_tokenizer(*request.param)


def random_tokens(tokenizer, n=BATCH, seed=0):
    return torch.randint(0, tokenizer.vocab_size, (n, *tokenizer.grid), generator=seeded(seed))


def test_tokenizer_describes_its_tokens(tokenizer, request):
    name, in_channels = request.node.callspec.params["tokenizer"]
    assert tokenizer.kind == name, "a kind's `kind` must be its registry name"
    assert isinstance(type(tokenizer).fitted, bool)
    assert isinstance(tokenizer.vocab_size, int) and tokenizer.vocab_size >= 2
    h, w = tokenizer.grid
    assert isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0
    assert tokenizer.values_per_pixel in (1, in_channels)
    assert w % tokenizer.values_per_pixel == 0
    assert isinstance(tokenizer.ordered, bool)
    assert tokenizer.image_size == SIZE and tokenizer.in_channels == in_channels
    assert tokenizer.image_dims == SIZE ** 2 * in_channels


def test_encode_gives_tokens_and_decode_gives_images(tokenizer):
    x = images(tokenizer.in_channels)
    tokens = tokenizer.encode(x)
    assert tokens.shape == (BATCH, *tokenizer.grid) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < tokenizer.vocab_size
    assert tokens.unique().numel() > 1, "random images all encode to one token"
    assert torch.equal(tokenizer.encode(x), tokens)  # deterministic
    # tokens from encode, and any tokens a prior may draw
    for t in (tokens, random_tokens(tokenizer)):
        decoded = tokenizer.decode(t)
        assert decoded.shape == (BATCH, tokenizer.in_channels, SIZE, SIZE)
        assert decoded.is_floating_point() and torch.isfinite(decoded).all()
        assert decoded.min() >= 0 and decoded.max() <= 1
        assert torch.equal(tokenizer.decode(t), decoded)  # deterministic


def test_encode_inverts_decode_on_encoded_tokens(tokenizer):
    """encode(decode(t)) == t for t = encode(x): holds for the lossless kinds (pixels: levels
    decode to their own value, palette entries to their own colour); not for a learned
    decoder (vqvae)."""
    if not tokenizer.lossless:
        pytest.skip(f"the {tokenizer.kind} tokenizer is lossy (a learned decoder)")
    tokens = tokenizer.encode(images(tokenizer.in_channels))
    assert torch.equal(tokenizer.encode(tokenizer.decode(tokens)), tokens)


def test_known_pixels_of_all_and_no_tokens(tokenizer):
    shape = (BATCH, *tokenizer.grid)
    everything = tokenizer.known_pixels(torch.ones(shape, dtype=torch.bool))
    nothing = tokenizer.known_pixels(torch.zeros(shape, dtype=torch.bool))
    for mask in (everything, nothing):
        assert mask.shape == (BATCH, 1, SIZE, SIZE) and mask.dtype == torch.bool
    assert everything.all() and not nothing.any()
    # the bottom pixel row depends on the last token row: unknown when that row is
    top = torch.zeros(shape, dtype=torch.bool)
    top[:, :-1] = True
    assert not tokenizer.known_pixels(top)[:, :, -1].any()


def test_tokenizer_checkpoint_round_trip_gives_identical_encodes_and_decodes(tokenizer,
                                                                            tmp_path):
    path = tmp_path / "tokenizer.pt"
    save_checkpoint({"kind": tokenizer.kind, "config": dataclasses.asdict(tokenizer.config),
                     "model": tokenizer.state_dict()}, path)
    checkpoint = load_checkpoint(path, tokenizer.kind)
    loaded = image_tokenizers.from_checkpoint(checkpoint)
    assert type(loaded) is type(tokenizer) and loaded.kind == checkpoint["kind"]
    assert not loaded.training and loaded.config == tokenizer.config
    x = images(tokenizer.in_channels, seed=1)
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    tokens = random_tokens(tokenizer, seed=1)
    assert torch.equal(loaded.decode(tokens), tokenizer.decode(tokens))


def test_a_kind_is_fitted_in_one_pass_or_trained_by_steps(tokenizer):
    model_class = type(tokenizer)
    x = images(tokenizer.in_channels, seed=2)
    if model_class.fitted:
        fitted = model_class.fit(tokenizer.config, x, seed=0)
        assert type(fitted) is model_class and fitted.config == tokenizer.config
        again = model_class.fit(tokenizer.config, x, seed=0)
        assert torch.equal(fitted.eval().encode(x), again.eval().encode(x))  # seeded
    else:
        with pytest.raises(NotImplementedError):
            model_class.fit(tokenizer.config, x, seed=0)
        before = snapshot(tokenizer)
        reconstruction, loss, tokens = tokenizer(x)  # eval mode: no codebook update
        assert reconstruction.shape == x.shape
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert torch.equal(tokens, tokenizer.encode(x))
        for key, value in before.items():
            assert torch.equal(value, tokenizer.state_dict()[key]), f"eval forward changed {key}"


# ---------------------------------------------------------------------------------------------
# the two together

@pytest.mark.parametrize("family", PRIOR_FAMILIES)
def test_every_prior_family_scores_every_tokenizers_tokens(tokenizer, family):
    """The data fields a tokenizer describes build a prior of each family with its default
    head (the convolutional families' `auto` picks the mixture head for RGB levels), and the
    prior scores the encoded tokens."""
    h, w = tokenizer.grid
    torch.manual_seed(0)
    model = priors.build(family, dict(vocab_size=tokenizer.vocab_size, grid_h=h, grid_w=w,
                                      channels=tokenizer.values_per_pixel,
                                      ordered=tokenizer.ordered, num_classes=0)).eval()
    tokens = tokenizer.encode(images(tokenizer.in_channels, n=2))
    values = model.nll(tokens, generator=seeded())
    assert values.shape == (2,) and torch.isfinite(values).all() and (values >= 0).all()
