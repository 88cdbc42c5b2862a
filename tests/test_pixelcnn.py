"""The convolutional priors (pixelcnn/): masking proven by changing pixels, the gated stack
without a blind spot, PixelCNN++'s two streams, PixelSNAIL's strictly causal attention, labels
reaching every block at every position, checkpoints from before the label maps, normalised
likelihoods, the exact row-cropped sampler. Tiny models in float64 on the CPU (so an output
that does not read a pixel is bit-for-bit unchanged)."""

import dataclasses
import itertools
import tempfile
from functools import partial

import numpy as np
import pytest
import torch

import priors
from pipeline.codes import load_run_codes
from core.config import from_record
from core.errors import UserError
from pixelcnn.base import ConvPrior
from pixelcnn.gated_pixelcnn import GatedLayer
from pixelcnn.layers import CausalAttention, GatedResnet, LabelBias
from pixelcnn.pixelcnn import ResidualBlock

FAMILIES = ["pixelcnn", "gated_pixelcnn", "pixelcnnpp", "pixelsnail"]
TINY = {
    "pixelcnn": dict(filters=8, n_layers=2, first_kernel=3, output_filters=8),
    "gated_pixelcnn": dict(filters=8, n_layers=3),
    "pixelcnnpp": dict(filters=8, n_resnet=1, n_scales=2),
    "pixelsnail": dict(filters=8, n_blocks=2, n_resnet=1, n_head=2, key_dim=4, value_dim=8),
}


def tiny(name, h=5, w=6, channels=1, vocab=8, **overrides):
    """A tiny model of family `name` over an h x w grid of pixels with `channels` values each;
    RGB (channels 3) gets the mixture head, as the family would on RGB levels."""
    torch.manual_seed(0)
    config = {"vocab_size": vocab, "grid_h": h, "grid_w": w * channels, "channels": channels,
              "ordered": channels > 1, "embed_dim": 4, "dropout": 0.0, **TINY[name], **overrides}
    return priors.build(name, config).double().eval()


def changed_by_each_pixel(model, h, w, labels=None, tries=2, outputs=None):
    """(P, P) bool: [p, q] is True when changing every value of pixel q changed the output
    at pixel p, for some of `tries` random images. `outputs(model, tokens, labels)` picks what
    to compare (default: the head outputs, (N, P, out_dim))."""
    outputs = outputs or (lambda m, t, y: m(t, y)[0])
    channels, vocab = model.config.channels, model.config.vocab_size
    pixels = h * w
    generator = torch.Generator().manual_seed(1)
    changed = False
    for _ in range(tries):
        image = torch.randint(vocab, (1, pixels, channels), generator=generator)
        edited = image.repeat(pixels, 1, 1)  # copy q has pixel q changed, every channel
        q = torch.arange(pixels)
        edited[q, q] = (edited[q, q] + torch.randint(1, vocab, (pixels, channels),
                                                     generator=generator)) % vocab
        y = None if labels is None else torch.full((1,), labels)
        with torch.no_grad():
            before = outputs(model, image.view(1, h, w * channels), y)
            after = outputs(model, edited.view(pixels, h, w * channels),
                            None if y is None else y.expand(pixels))
        changed = changed | ((after - before).flatten(2).abs().amax(-1) > 1e-12).T  # (p, q)
    return changed


def earlier(pixels):
    """(P, P) bool: [p, q] is True when q comes strictly before p in raster order."""
    return torch.ones(pixels, pixels, dtype=torch.bool).tril(-1)


# masking


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_no_output_reads_its_own_pixel_or_a_later_one(name, channels):
    model = tiny(name, channels=channels)
    changed = changed_by_each_pixel(model, 5, 6)
    leaks = (changed & ~earlier(30)).nonzero().tolist()
    assert leaks == [], f"output at p reads pixel q >= p: {leaks[:5]}"
    assert changed.any()  # the check can see a dependency at all


@pytest.mark.parametrize("name", ["pixelcnnpp", "pixelsnail"])
def test_every_output_reads_every_earlier_pixel(name):
    """Their receptive field covers this grid: each output reads exactly the pixels before it
    (PixelCNN++'s u stream brings the up-right region, PixelSNAIL's attention everything)."""
    model = tiny(name, h=5, w=6)
    assert torch.equal(changed_by_each_pixel(model, 5, 6), earlier(30))


def gated_field(h, w, row, col, layers):
    """The pixels a gated stack of `layers` 3x3 layers reads for pixel (row, col): rows up to
    layers + 1 above, columns within `layers` on both sides, and `layers` pixels to its left."""
    field = torch.zeros(h, w, dtype=torch.bool)
    left, right = max(0, col - layers), min(w, col + layers + 1)
    field[max(0, row - layers - 1):row, left:right] = True
    field[row, left:col] = True
    return field


def test_gated_stack_reads_every_pixel_of_its_field_and_plain_pixelcnn_misses_the_up_right():
    h, w, layers = 7, 7, 2
    gated = tiny("gated_pixelcnn", h, w, n_layers=layers)
    changed = changed_by_each_pixel(gated, h, w)
    for row, col in itertools.product(range(h), range(w)):
        reads = changed[row * w + col].view(h, w)
        assert torch.equal(reads, gated_field(h, w, row, col, layers)), (row, col)
    # The same check on the original masked convolutions finds their blind spot: pixel (5, 3)
    # cannot see (4, 5) or (3, 6), up and to the right, although it sees (2, 6) further up.
    plain = tiny("pixelcnn", h, w, n_layers=layers)
    reads = changed_by_each_pixel(plain, h, w)[5 * w + 3].view(h, w)
    assert reads[2, 6] and not reads[4, 5] and not reads[3, 6]


def block_outputs(kind):
    """outputs() for changed_by_each_pixel: the outputs of every block of class `kind`,
    stacked as (N, blocks, C, H, W) (first outputs only for blocks returning pairs)."""
    def outputs(model, tokens, labels):
        kept = []
        hooks = [m.register_forward_hook(lambda mod, args, out: kept.append(
            out[0] if isinstance(out, tuple) else out)) for m in model.modules()
            if isinstance(m, kind)]
        try:
            model(tokens, labels)
        finally:
            for hook in hooks:
                hook.remove()
        return kept
    return outputs


def test_pixelcnnpp_each_block_keeps_its_streams_field_at_every_scale():
    """u blocks (up and down pass) read rows above only; ul blocks the pixels before. At a scale
    of factor f = 2^s, feature (r, c) stands for pixel (f r, f c). A down pass that fed a u
    block the ul stream would let u read its own row, and this test fails."""
    h, w = 4, 4
    model = tiny("pixelcnnpp", h, w, n_scales=2, n_resnet=1)
    streams = {"u": [*model.up_u, *model.down_u], "ul": [*model.up_ul, *model.down_ul]}
    for stream, blocks in streams.items():
        for block in blocks:
            def outputs(m, tokens, labels, block=block):
                kept = []
                hook = block.register_forward_hook(lambda mod, args, out: kept.append(out))
                m(tokens, labels)
                hook.remove()
                return kept[0]  # (N, F, rows, cols) at the block's scale
            kept_shape = outputs(model, torch.zeros(1, h, w, dtype=torch.long), None).shape
            factor = h // kept_shape[2]
            changed = changed_by_each_pixel(
                model, h, w, outputs=lambda m, t, y: outputs(m, t, y).flatten(2).transpose(1, 2))
            rows, cols = kept_shape[2:]
            for (r, c), q in itertools.product(itertools.product(range(rows), range(cols)),
                                               range(h * w)):
                if not changed[r * cols + c, q]:
                    continue
                q_row, q_col = divmod(q, w)
                if stream == "u":
                    assert q_row < factor * r, (stream, block, r, c, q)
                else:
                    assert (q_row, q_col) < (factor * r, factor * c), (stream, block, r, c, q)


def test_pixelsnail_attention_is_strict_the_first_position_attends_to_nothing():
    torch.manual_seed(0)
    attention = CausalAttention(3, 5, key_dim=4, value_dim=6, heads=2).double()
    query, keys = torch.randn(1, 3, 3, 4).double(), torch.randn(1, 5, 3, 4).double()
    out = attention(query, keys).flatten(2)  # (1, 6, 12)
    assert torch.equal(out[..., 0], torch.zeros(1, 6))  # not even itself
    for q in range(12):  # a key/value at q changes only the outputs after q
        edited = keys.clone().flatten(2)
        edited[..., q] += 1.0
        moved = (attention(query, edited.view_as(keys)).flatten(2) - out).abs().amax(1)[0]
        assert torch.equal(moved[:q + 1] > 0, torch.zeros(q + 1, dtype=torch.bool))
        assert (moved[q + 1:] > 0).all()


# labels


BLOCKS = (ResidualBlock, GatedLayer, GatedResnet)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_block_reads_the_label_itself(name):
    """Each residual / gated block, given the same inputs, changes its output at every
    position with the label: the label reaches every block directly, not only through the
    first layer. (A model that added the class vector to its input only would fail.) PixelCNN
    is wider here: with 4 channels at its ReLU, a position may have all of them shut for two
    labels."""
    model = tiny(name, num_classes=3, **({"filters": 16} if name == "pixelcnn" else {}))
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS)]
    expected = {"pixelcnn": 2, "gated_pixelcnn": 3, "pixelcnnpp": 4 + 2 * (1 + 2),
                "pixelsnail": 2 * (1 + 1 + 1)}[name]
    assert len(blocks) == expected
    tokens = torch.randint(8, (2, 5, 6), generator=torch.Generator().manual_seed(0))
    fixed, seen = {}, {}

    def same_inputs(module, args, kwargs):  # the first run's inputs, for every label
        fixed.setdefault(module, args)
        return fixed[module], kwargs

    def record(module, args, out):
        seen.setdefault(module, []).append(out if isinstance(out, tuple) else (out,))

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(same_inputs, with_kwargs=True),
                                         b.register_forward_hook(record))]
    outs = [model(tokens, torch.tensor([label, label]))[0] for label in (0, 1, 3)]  # 3: null
    for hook in hooks:
        hook.remove()
    for block in blocks:
        for a, b in itertools.combinations(range(3), 2):
            for out_a, out_b in zip(seen[block][a], seen[block][b]):
                assert (out_a - out_b).abs().flatten(2).amax(1).min() > 0, (block, a, b)
    for a, b in itertools.combinations(outs, 2):  # and every pixel's output, the first included
        assert (a - b).abs().amax(-1).min() > 1e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layer_adds_a_label_term_that_varies_by_position(name):
    """Every layer's label term (LabelBias) is used in the forward pass, differs between labels
    at every position, and, from the label maps, between positions for one label: a per-channel
    bias alone (--label_maps 0) is the same at every position."""
    model = tiny(name, num_classes=3)
    terms = [m for m in model.modules() if isinstance(m, LabelBias)]
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS)]
    assert len(terms) == len(blocks) + (name == "pixelcnn")  # PixelCNN's first layer too
    seen = {}
    hooks = [t.register_forward_hook(lambda m, args, out: seen.setdefault(m, []).append(out))
             for t in terms]
    tokens = torch.randint(8, (1, 5, 6), generator=torch.Generator().manual_seed(0))
    for label in (0, 1, 3):  # 3: the null label
        model(tokens, torch.tensor([label]))
    for hook in hooks:
        hook.remove()
    for term in terms:
        outs = seen[term]  # one (1, C, h, w) term per label
        assert len(outs) == 3
        for a, b in itertools.combinations(outs, 2):
            assert (a - b).abs().amax(1).min() > 0, term
        assert (outs[0] - outs[0][..., :1, :1]).abs().amax() > 0  # not one bias everywhere
    bias_only = tiny(name, num_classes=3, label_maps=0)
    assert all(t.map is None for t in bias_only.modules() if isinstance(t, LabelBias))


@pytest.mark.parametrize("name", FAMILIES)
def test_a_checkpoint_from_before_label_maps_loads_and_computes_as_before(name, tmp_path):
    """A checkpoint written before --label_maps (its config lacks the field, its weights the
    maps) loads weights-only as the model it was, without maps, and gives the same outputs and
    samples; a resume rebuilds that model too (its optimizer state fits)."""
    old = tiny(name, num_classes=3, label_maps=0)  # the layout before the maps
    config = dataclasses.asdict(old.config)
    del config["label_maps"]
    torch.save({"family": name, "config": config, "model": old.state_dict()}, tmp_path / "old.pt")
    loaded = priors.from_checkpoint(torch.load(tmp_path / "old.pt", weights_only=True))
    assert loaded.config.label_maps == 0 and loaded.label_map is None  # not today's default
    assert from_record(type(old.config), config).label_maps == 0
    assert tiny(name, num_classes=3).label_map is not None  # a new model has them
    loaded = loaded.double()
    tokens = torch.randint(8, (2, 5, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(loaded(tokens, labels)[0], old(tokens, labels)[0],
                               atol=1e-12, rtol=0)
    draw = lambda m: m.sample(2, labels=labels, guidance=2.0,
                              generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw(loaded), draw(old))


# likelihoods


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("channels,head", [(1, "softmax"), (1, "mixture"), (3, "mixture")])
def test_probabilities_of_every_image_sum_to_one(name, channels, head):
    """Enumerate every image of a tiny grid: exp(-nll) sums to 1 (2x2 grey pixels over 3
    values, or 1x2 RGB pixels over 2 values per channel). Only a model whose outputs read
    nothing at or after their own pixel, with normalised heads, passes."""
    h, w, vocab = (2, 2, 3) if channels == 1 else (1, 2, 2)
    model = tiny(name, h, w, channels, vocab, head=head, ordered=head == "mixture", mixtures=2)
    every = torch.tensor(list(itertools.product(range(vocab), repeat=h * w * channels)))
    nll = model.nll(every.view(-1, h, w * channels)).double()  # the heads score in float32
    torch.testing.assert_close(nll.neg().exp().sum().item(), 1.0, atol=1e-5, rtol=0)
    out, loss = model(every.view(-1, h, w * channels))
    torch.testing.assert_close(loss.item(), nll.mean().item() / (h * w * channels))  # per token


def test_softmax_head_is_refused_for_rgb_levels_and_mixture_for_codes():
    with pytest.raises(UserError, match="use --head mixture"):
        tiny("pixelcnn", channels=3, head="softmax")
    with pytest.raises(UserError, match="needs ordered tokens"):
        tiny("pixelcnnpp", head="mixture", ordered=False)
    assert tiny("pixelsnail", channels=3).config.head == "mixture"  # auto: mixture for levels
    assert tiny("pixelsnail").config.head == "softmax"  # auto: softmax for unordered codes


# sampling


@pytest.mark.parametrize("name", FAMILIES)
def test_each_sampling_step_equals_the_full_forward(name):
    """step() computes a pixel's outputs from the rows they read (rows_above of them, for the
    finite fields of PixelCNN and the gated stack), or, for PixelCNN, from cached layer inputs:
    exactly the full forward's output there."""
    h, w = 7, 3
    model = tiny(name, h, w, channels=3, num_classes=3, n_layers=2)
    tokens = torch.randint(8, (2, h, w * 3), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])
    full, _ = model(tokens, labels)
    if model.rows_above is not None:
        assert model.rows_for(h - 1) > 0  # the crop starts below row 0 here
    # the family's sampler (PixelCNN: cached layer inputs), and the row crop they all have
    for begin, step in [(model.begin, model.step),
                        (partial(ConvPrior.begin, model), partial(ConvPrior.step, model))]:
        state = begin(2, labels)
        for p in range(h * w):
            torch.testing.assert_close(step(state, p, tokens.view(2, h * w, 3)), full[:, p],
                                       atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_keeps_a_raster_prefix_and_follows_labels(name):
    model = tiny(name, 4, 4, num_classes=3).float()
    known = torch.randint(8, (3, 4, 4))
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    drawn = model.sample(3, labels=torch.tensor([0, 1, 2]), known=known, known_mask=mask,
                         guidance=2.0, temperature=0.9, top_k=5,
                         generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 4, 4) and drawn.max() < 8
    assert torch.equal(drawn[mask], known[mask])
    with pytest.raises(UserError, match="does not take --sampler"):
        model.sample(1, sampler="confidence")


# through the scripts: train.py --prior NAME, generation, completion, evaluation


SCRIPT_FLAGS = {
    "pixelcnn": ["--n_layers", "1", "--first_kernel", "3", "--output_filters", "8"],
    "gated_pixelcnn": ["--n_layers", "2"],
    "pixelcnnpp": ["--n_resnet", "1", "--n_scales", "2"],
    "pixelsnail": ["--n_blocks", "1", "--n_resnet", "1", "--n_head", "2", "--key_dim", "4",
                   "--value_dim", "8"],
}


def train_tiny(name, tokenizer_run, *extra):
    import train as train_prior_script
    from conftest import run_main
    return run_main(train_prior_script.main, [
        "--prior", name, "--run_id", tokenizer_run, "--filters", "8", "--embed_dim", "4",
        "--batch_size", "8", "--max_steps", "3", "--eval_every", "3", *SCRIPT_FLAGS[name],
        *extra])


@pytest.mark.parametrize("name", FAMILIES)
def test_family_on_vq_codes_trains_generates_completes_and_evaluates(chain, name, tmp_path,
                                                                     capsys):
    import transformer_generation
    from conftest import run_main
    from pipeline import tracking
    from pipeline.__main__ import main as pipeline_main
    from test_bad_input import cli_error
    prior = train_tiny(name, chain["vqvae"], "--conditional", "--ema_decay", "0.9")
    run = tracking.client().get_run(prior)
    assert run.data.tags[tracking.PRIOR_TAG] == name and run.data.params["head"] == "softmax"
    # per image dimension: 16 codes of 4 bits over 16x16 pixels is 0.25 bits/dim if uniform
    assert 0 < run.data.metrics["val/bits_per_dim"] < 2 * 16 * 4 / 256
    run_main(transformer_generation.main, ["--run_id", prior, "--labels", "0,2", "--guidance",
                                           "2", "--name", "drawn", "--out_dir", str(tmp_path)])
    assert tracking.load_json_artifact(prior, "generated/drawn.json")["labels"] == ["0", "2"]
    assert len(list(tmp_path.glob("sample_*.png"))) == 2
    run_main(transformer_generation.main, ["--run_id", prior, "--complete", str(chain["csv"]),
                                           "--keep", "top", "--num_completions", "2",
                                           "--max_images", "2", "--name", "top"])
    run_main(pipeline_main, ["evaluate", "--run_id", prior, "--path_to_data", str(chain["csv"]),
                             "--name", "heldout"])
    bits = tracking.client().get_run(prior).data.metrics["eval/heldout/bits_per_dim"]
    assert 0 < bits < 2 * 16 * 4 / 256
    assert cli_error(pipeline_main, ["probe", "--run_id", prior, "--path_to_data",
                                     str(chain["csv"])], capsys) == (
        f"error: --run_id {prior}: the {name} prior has no per-layer features to probe (the "
        f"gpt and absorbing priors have)")


@pytest.fixture(scope="module")
def grey_csv(tmp_path_factory):
    from conftest import make_images, write_csv
    folder = tmp_path_factory.mktemp("grey8")
    names = make_images(folder / "imgs", n=24, size=8)  # 8x8: 64 sampling steps per image
    return write_csv(folder / "train.csv", [f"imgs/{n}" for n in names], header="image_path")


@pytest.fixture(scope="module")
def grey_levels(store, grey_csv):
    import quantize_dataset
    from conftest import run_main
    return run_main(quantize_dataset.main, ["--path_to_data", str(grey_csv), "--pixels",
                                            "levels", "--bits", "2"])


@pytest.mark.parametrize("name", FAMILIES)
def test_family_on_pixel_levels_uses_the_mixture_and_completes_the_top_half(
        grey_levels, grey_csv, name, tmp_path):
    import transformer_generation
    from conftest import run_main
    from pipeline import tracking
    from PIL import Image
    prior = train_tiny(name, grey_levels, "--mixtures", "2")
    run = tracking.client().get_run(prior)
    assert run.data.params["head"] == "mixture"  # auto, for ordered levels
    assert 0 < run.data.metrics["val/bits_per_dim"] < 2  # 2-bit levels: uniform is 2 bits/dim
    run_main(transformer_generation.main, ["--run_id", prior, "--num_samples", "2",
                                           "--out_dir", str(tmp_path)])
    assert Image.open(tmp_path / "sample_0000.png").size == (8, 8)
    run_main(transformer_generation.main, ["--run_id", prior, "--complete", str(grey_csv),
                                           "--keep", "top", "--num_completions", "1",
                                           "--max_images", "2", "--name", "top"])
    with tempfile.TemporaryDirectory() as tmp:
        drawn = np.load(tracking.download_artifact(prior, "completions/top/codes.npy", tmp))
    codes, _ = load_run_codes(grey_levels)
    assert np.array_equal(drawn[:, 0, :4], codes[:2, :4].numpy())  # the top 4 rows kept


def test_softmax_on_rgb_levels_is_a_one_line_error(store, tmp_path, capsys):
    import quantize_dataset
    import train as train_prior_script
    from conftest import make_images, run_main, write_csv
    from test_bad_input import cli_error
    names = make_images(tmp_path / "imgs", n=6, size=4, mode="RGB")
    csv = write_csv(tmp_path / "rgb.csv", [f"imgs/{n}" for n in names], header="image_path")
    levels = run_main(quantize_dataset.main, ["--path_to_data", str(csv), "--pixels", "levels",
                                              "--bits", "2"])
    message = cli_error(train_prior_script.main, ["--prior", "pixelsnail", "--run_id", levels,
                                                  "--head", "softmax"], capsys)
    assert "the softmax head takes one value per position" in message
    assert "use --head mixture" in message
