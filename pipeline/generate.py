"""Generation and decoding by run id: prior run -> token grids -> its tokenizer -> PNGs.

A prior run finds its tokenizer through the tag `pipeline.tokenizer_run_id` (or, for runs made
before the families, `pipeline.vqvae_run_id`); before decoding, the prior's vocabulary and grid
are checked against the tokenizer's. Nothing here knows the prior's family: it calls the
interface of priors/base.py.
"""

import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import priors
from pipeline import tracking
from pipeline.codes import check_codes, codes_dtype, pick_artifact, read_npy
from pipeline.device import autocast, pick_device, resolve_precision
from core.errors import UserError
from pipeline.progress import progress_bar
from pipeline.runs import load_run_checkpoint
from pipeline.sampling_gif import SamplingFrames, render, save_gif
from pipeline.tokenizers import load_tokenizer
from pipeline.tone import ToneCurve
from pipeline.visual import image_grid, save_png, save_pngs
from core.config import field
from priors.settings import SamplingConfig

LATEST_TAG = "pipeline.latest_generated"
TONE_SAMPLES = 4096  # the calibration draw of tone matching (pipeline/tone.py): at 1,024 the
# demo's FD ratio moved by 0.03 with the draw's seed, at 4,096 by 0.006
TONE_SEED = 2 ** 32  # its stream: out of reach of the small seeds users and quality draws take
TONE_BATCH = 512
# the settings every generated/<name>.json and tone curve key held, set or not, before the
# families described their own (priors/settings.py): hashed even when None, so the tone curves
# kept on prior runs keep their keys (tone_key)
TONE_KEY_SETTINGS = ("temperature", "top_k", "top_p", "steps", "guidance")


@dataclass
class GenerationConfig:
    """What a generation draws, besides the prior's sampling settings (priors/settings.py):
    the flags of transformer_generation.py and the pipeline's --sample.<flag> beside those."""
    num_samples: int = field(64, "images to draw (a list of labels draws one per label)")
    batch_size: Optional[int] = field(None, "grids sampled at once (unset: all at once)")
    seed: int = field(0, "seeds the draw: the same seed and settings give the same grids")
    labels: Optional[str] = field(None, "conditional priors: one sample per listed label, in "
                                        "order ('3,3,7'), or 'all' (each class in turn for "
                                        "num_samples)")
    tone_samples: int = field(TONE_SAMPLES, "tokenizers that record their training images' "
                                            "pixel quantiles (the VQ-VAE): grids of the draw "
                                            "that fits tone matching (docs/quality.md); drawn "
                                            "once per setting and kept on the prior run; 0 = off")
    gif: bool = field(False, "also make a GIF of the sampling (the grid filling or unmasking, "
                             "up to 64 images; pipeline/sampling_gif.py): logged as "
                             "generated/<name>.gif (completions/<name>/completion.gif) and "
                             "written to --out_dir")

    def validate(self):
        if self.num_samples < 1:
            raise UserError(f"--num_samples must be at least 1, got {self.num_samples}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.tone_samples < 0:
            raise UserError(f"--tone_samples must be at least 0 (0 = no tone matching), got "
                            f"{self.tone_samples}")


@dataclass
class Generated:
    """What generate() made; generated/<name>.json on the prior run records the same (`record`)."""
    codes: torch.Tensor              # (N, h, w) LongTensor, on the CPU
    name: str                        # generated/<name>.npy and .json on the prior run
    seconds: float                   # spent sampling
    images: Optional[torch.Tensor]   # decoded (and tone-mapped), None with no_decode
    tone: Optional[ToneCurve]        # the tone curve that mapped them, or None
    run_id: str                      # the prior run
    sampling: SamplingConfig         # the family's sampling settings, as drawn
    generation: GenerationConfig     # num_samples as drawn (one per label of a list)
    labels: Optional[list]           # the class name of each sample, or None
    record: dict                     # generated/<name>.json


class LoadedPrior:
    """A prior run, loaded: the model (averaged weights when it kept them), its run, the class
    names it was trained with, and its tokenizer run id. `precision` (auto | fp32 | bf16)
    resolves for the device (pipeline/device.py) to what sampling and decoding run in."""

    def __init__(self, run_id, device, flag="--run_id", precision="auto"):
        run_id = self.run_id = tracking.resolve_run_id(run_id, flag)  # models:/ URIs too
        self.run = tracking.get_run(run_id, "prior", flag=flag)
        checkpoint = load_run_checkpoint(run_id, "prior", ("prior", "transformer"), flag=flag)
        self.model = priors.from_checkpoint(checkpoint).to(device)
        self.family = self.model.family
        data = checkpoint.get("data") or checkpoint.get("vqvae") or {}
        self.classes = data.get("classes")
        self.class_counts = data.get("class_counts")  # of the training split, where recorded
        self.tokenizer_run_id = tracking.tokenizer_run_of(self.run)
        self.device = device
        self.precision = resolve_precision(precision, device)

    def tokenizer(self, flag="--run_id"):
        if not self.tokenizer_run_id:
            raise UserError(f"{flag} {self.run_id}: the prior was trained from a local file and "
                            f"names no tokenizer; decode with images_from_indexes.py "
                            f"--tokenizer_run_id ID --indexes_path FILE")
        tokenizer = load_tokenizer(self.tokenizer_run_id, self.device,
                                   flag="tokenizer run (from the prior's lineage tag)",
                                   precision=self.precision)
        check_prior_matches(self.model.config, tokenizer, self.run_id)
        return tokenizer

    def label_ids(self, spec, num_samples, flag="--labels"):
        """'3,3,7' -> one sample per listed label, in order; 'all' -> each class in turn for
        num_samples; None -> None. Returns (ids LongTensor or None, num_samples)."""
        if spec is None:
            return None, num_samples
        if not self.classes:
            raise UserError(f"{flag}: prior {self.run_id} was trained without --conditional")
        if str(spec).strip() == "all":
            return torch.arange(num_samples) % len(self.classes), num_samples
        names = [s.strip() for s in str(spec).split(",") if s.strip()]
        return self.class_ids(names, flag), len(names)

    def calibration_labels(self, count):
        """count class ids in the training split's proportions (uniform for priors that did
        not record them), or None for an unconditional prior: what tone matching draws."""
        if not self.classes:
            return None
        counts = torch.tensor(self.class_counts or [1] * len(self.classes), dtype=torch.float)
        # deterministic proportional allocation: evenly spaced points on the counts' CDF
        points = (torch.arange(count) + 0.5) / count
        ids = torch.searchsorted(counts.cumsum(0) / counts.sum(), points)
        return ids.clamp(max=len(self.classes) - 1)

    def class_ids(self, names, where):
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = [n for n in map(str, names) if n not in index]
        if unknown:
            raise UserError(f"{where}: unknown label '{unknown[0]}'; the prior knows "
                            f"{', '.join(self.classes)}")
        return torch.tensor([index[str(n)] for n in names], dtype=torch.long)


def check_prior_matches(prior_config, tokenizer, run_id):
    if prior_config.vocab_size != tokenizer.vocab_size:
        raise UserError(f"--run_id {run_id}: the prior's vocabulary ({prior_config.vocab_size}) "
                        f"does not match its tokenizer's ({tokenizer.vocab_size})")
    if (prior_config.grid_h, prior_config.grid_w) != tuple(tokenizer.grid):
        raise UserError(f"--run_id {run_id}: the prior's grid ({prior_config.grid_h}, "
                        f"{prior_config.grid_w}) does not match its tokenizer's "
                        f"{tuple(tokenizer.grid)}")


def decode_and_log(tokenizer, codes, log_run_id, name, out_dir=None, where="", tone=None,
                   progress=True):
    """Decode (then map by the ToneCurve `tone` when given), log a grid (key "samples") and
    samples/<name>/*.png to `log_run_id`, and write the PNGs and grid.png to out_dir when given.
    progress: a bar (pipeline/progress.py) while decoding. Returns the images."""
    codes = check_codes(codes.numpy() if torch.is_tensor(codes) else codes,
                        tokenizer.vocab_size, where)
    grid = tuple(codes.shape[1:])
    # a grid larger than the tokenizer's decodes to larger images (absorbing's --grid_h/w)
    if grid[0] < tokenizer.grid[0] or grid[1] < tokenizer.grid[1] or \
            grid[1] % tokenizer.values_per_pixel:
        raise UserError(f"{where}: code grid {grid} does not fit the tokenizer's "
                        f"{tuple(tokenizer.grid)} (it may be larger, with whole pixels, not smaller)")
    with progress_bar(len(codes), "decoding", "grid", progress) as bar:
        images = decode(tokenizer, codes, bar)
    if tone is not None:
        images = tone(images)
    grid = image_grid(images[:64], ncol=8)
    # the run page's card: 16 large enough to judge; all of them are under samples/<name>/
    shown = min(16, len(images))
    tracking.log_image(log_run_id, image_grid(images[:shown], ncol=4, title=(
        f"{name}: {shown} of {len(images)} samples")), "samples", step=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_pngs(images, Path(tmp) / name)
        tracking.log_artifacts(log_run_id, Path(tmp) / name, f"samples/{name}")
    if out_dir:
        save_pngs(images, out_dir)
        save_png(grid, Path(out_dir) / "grid.png")
        print(f"wrote {len(images)} PNGs and grid.png to {out_dir}", file=sys.stderr)
    return images


def sample_tokens(model, num_samples, batch_size, labels=None, generator=None, frames=None,
                  precision="fp32", bar=None, **settings):
    """Draw num_samples grids in batches (labels (num_samples,) or None); -> LongTensor CPU.
    `frames` (a sampling_gif.SamplingFrames) records the steps of a GIF; `bar` (a progress_bar
    counting grids, maybe shared by several draws) advances at every network evaluation.
    precision: resolved (pipeline/device.py); the draws themselves (log-softmax, filters) are
    fp32 (priors/sampling.py), the GPT's KV cache is its `cache_dtype` setting's."""
    device = next(model.parameters()).device
    chunks = []
    start = bar.n if bar is not None else 0
    with autocast(device, precision):
        for i in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - i)
            chunk_labels = labels[i:i + count].to(device) if labels is not None else None
            extra = {}
            if frames is not None:
                extra["on_step"] = frames.batch(count)
            if bar is not None and not bar.disable:
                extra["on_progress"] = lambda share, count=count: bar.update(count * share)
            chunks.append(model.sample(count, chunk_labels, generator=generator, **extra,
                                       **settings).cpu())
            if bar is not None:  # exactly the grids drawn (a sampler may end a step early)
                bar.update(start + i + count - bar.n)
    return torch.cat(chunks)


def decode(tokenizer, codes, bar=None, batch_size=256):
    """tokenizer.decode(codes) in batches of `batch_size` grids, advancing `bar` (a
    progress_bar counting grids) by each."""
    images = []
    for i in range(0, len(codes), batch_size):
        images.append(tokenizer.decode(codes[i:i + batch_size], batch_size))
        if bar is not None:
            bar.update(len(images[-1]))
    return torch.cat(images)


def log_gif(frames, tokenizer, tone, run_id, artifact, out_dir=None, file_name=None, ncol=8,
            row_titles=None):
    """Render a SamplingFrames (pipeline/sampling_gif.py), log it to the run as `artifact`
    (e.g. generated/<name>.gif) and write it to out_dir/file_name when out_dir is given."""
    images = render(frames.frames(), tokenizer, tone, ncol, row_titles)
    grey = tokenizer.in_channels == 1
    with tempfile.TemporaryDirectory() as tmp:
        path = save_gif(images, Path(tmp) / Path(artifact).name, grey)
        tracking.log_artifact(run_id, path, str(Path(artifact).parent))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_gif(images, Path(out_dir) / file_name, grey)
    print(f"sampling GIF: {len(images)} frames, logged as {artifact}"
          + (f" and written to {Path(out_dir) / file_name}" if out_dir else ""), file=sys.stderr)


def tone_applies(tokenizer, settings, count):
    """Tone matching needs a calibration draw (count > 0), the training images' quantiles (a
    VQ-VAE that recorded them) and grids of the tokenizer's own size (a larger grid's images
    are not the training images' kind)."""
    return bool(count) and tokenizer.pixel_quantiles is not None and \
        not (settings.get("grid_h") or settings.get("grid_w"))


def calibrate_tone(model, tokenizer, labels, settings, count=TONE_SAMPLES, batch_size=None,
                   precision="fp32", progress=True):
    """Tone matching's curve for these sampling settings (pipeline/tone.py), fitted on a draw of
    `count` grids with `labels` ((count,) class ids, LoadedPrior.calibration_labels, or None),
    in batches of at most TONE_BATCH, from its own stream (TONE_SEED: every caller fits the same
    curve, and the samples and quality draws of any seed are untouched). None where tone
    matching does not apply (tone_applies): pixel tokenizers, VQ-VAE runs from before it, larger
    grids, count 0. progress: bars (pipeline/progress.py) over the draw, then its decoding."""
    if not tone_applies(tokenizer, settings, count):
        return None
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(TONE_SEED)
    with progress_bar(count, "tone calibration", "grid", progress) as bar:
        codes = sample_tokens(model, count, min(batch_size or TONE_BATCH, TONE_BATCH), labels,
                              generator, precision=precision, bar=bar, **settings)
    with progress_bar(count, "tone calibration (decoding)", "grid", progress) as bar:
        images = decode(tokenizer, codes, bar)
    return ToneCurve.fit(images, tokenizer.pixel_quantiles)


def tone_key(settings, count):
    """The key of a tone curve (tone/<key>.json): a hash of the sampling settings that are set
    (and of TONE_KEY_SETTINGS, set or not, as before) and of the calibration draw's size."""
    hashed = {k: settings.get(k) for k in TONE_KEY_SETTINGS}
    hashed.update({k: v for k, v in settings.items() if v is not None})
    return hashlib.sha256(json.dumps({**hashed, "tone_samples": count},
                                     sort_keys=True).encode()).hexdigest()[:16]


def tone_path(settings, count):
    """Where a prior run keeps its tone curve for these settings and calibration count."""
    return f"tone/{tone_key(settings, count)}.json"


def prior_tone(prior, tokenizer, settings, count=TONE_SAMPLES, batch_size=None, progress=True):
    """The prior's tone curve for these settings: fitted by the first generation that asks for
    it (calibrate_tone, with progress bars unless progress=False) and kept on the prior run as
    tone/<key>.json, which later ones read, so the calibration draw is paid once per setting,
    not per request."""
    if not tone_applies(tokenizer, settings, count):
        return None
    path = tone_path(settings, count)
    if path in tracking.list_artifacts(prior.run_id, "tone"):
        return ToneCurve.from_dict(tracking.load_json_artifact(prior.run_id, path)["curve"])
    start = time.perf_counter()
    tone = calibrate_tone(prior.model, tokenizer, prior.calibration_labels(count), settings,
                          count, batch_size, prior.precision, progress)
    if tone is not None:
        tracking.log_json(prior.run_id, {"settings": settings, "tone_samples": count,
                                         "curve": tone.to_dict()}, path)
        print(f"tone matching: fitted on {count} grids in {time.perf_counter() - start:.1f} s, "
              f"kept as {path} for later generations at these settings", file=sys.stderr)
    return tone


def generate(run_id, num_samples=64, batch_size=None, seed=0, out_dir=None, no_decode=False,
             name=None, device=None, labels=None, tone_samples=TONE_SAMPLES, gif=False,
             precision="auto", progress=True, time_limit_s=None, **settings):
    """Sample token grids from a prior run, log generated/<name>.npy (+ .json), decode unless
    no_decode. The generation's fields are GenerationConfig's (`labels`: '3,3,7' or 'all', for
    conditional priors); `settings` (temperature=, top_k=, ..., steps=, sampler=, ...) are the
    fields of the prior family's sampling dataclass (priors.sampling_class), None meaning not
    given; an option the family does not take is refused.
    Decoded images are tone-matched by the prior's curve for these settings (prior_tone: a draw
    of `tone_samples` grids, once per setting; 0: off); the curve goes into the .json, so
    images_from_indexes decodes the same images. With gif, a GIF of the sampling (the first
    64 grids, pipeline/sampling_gif.py) is logged as generated/<name>.gif and written to
    out_dir as sampling.gif. precision: auto | fp32 | bf16 (pipeline/device.py), resolved
    for the device and recorded in the .json. progress: bars on stderr for the waits past
    2 s (pipeline/progress.py). time_limit_s (the one command's --minutes): what sampling and
    the tone calibration draw may take together; the draw is cut to the grids that fit, at the
    sampling speed just measured (in multiples of TONE_BATCH; none fit: no tone matching).
    Returns a Generated."""
    generation = GenerationConfig(num_samples, batch_size, seed, labels, tone_samples, gif)
    generation.validate()
    if gif and no_decode:
        raise UserError("--gif shows decoded images: drop --no_decode")
    device = pick_device(device)
    prior = LoadedPrior(run_id, device, precision=precision)
    sampling = priors.sampling_settings(prior.family, settings)
    label_ids, num_samples = prior.label_ids(labels, num_samples)
    generation = dataclasses.replace(generation, num_samples=num_samples)
    tokenizer = None if no_decode else prior.tokenizer()  # check before spending time sampling

    generator = torch.Generator(device=device).manual_seed(seed)
    drawn = dataclasses.asdict(sampling)  # what the prior's sample() takes
    frames = SamplingFrames() if gif else None
    start = time.perf_counter()
    with progress_bar(num_samples, "sampling", "grid", progress) as bar:
        codes = sample_tokens(prior.model, num_samples, batch_size or num_samples, label_ids,
                              generator, frames, prior.precision, bar, **drawn)
    seconds = time.perf_counter() - start
    print(f"sampled {num_samples} grids ({codes[0].numel()} tokens each) in {seconds:.2f} s: "
          f"{codes.numel() / seconds:.0f} tokens/s ({prior.precision})", file=sys.stderr)
    if (time_limit_s is not None and tokenizer is not None
            and tone_applies(tokenizer, drawn, tone_samples)
            and tone_path(drawn, tone_samples)
            not in tracking.list_artifacts(prior.run_id, "tone")):
        # a calibration draw to pay for (none kept for these settings): as much as fits
        left_s = max(0.0, time_limit_s - seconds)
        fit = int(left_s * num_samples / seconds)
        fit = fit // TONE_BATCH * TONE_BATCH if fit > TONE_BATCH else fit
        if fit < tone_samples:
            print(f"tone matching: {fit or 'no'} calibration grids of {tone_samples} fit in the "
                  f"{left_s:.0f} s left to it", file=sys.stderr)
            tone_samples = fit
            generation = dataclasses.replace(generation, tone_samples=fit)
    tone = (prior_tone(prior, tokenizer, drawn, tone_samples, batch_size, progress)
            if tokenizer is not None else None)

    name = name or time.strftime("gen-%Y%m%d-%H%M%S")
    run_id = prior.run_id
    names = [prior.classes[i] for i in label_ids.tolist()] if label_ids is not None else None
    record = {"prior_run_id": run_id, "prior": prior.family,
              "codebook_size": prior.model.config.vocab_size, "grid": list(codes.shape[1:]),
              "tokenizer_run_id": prior.tokenizer_run_id,
              **dataclasses.asdict(generation), **drawn, "labels": names,
              "tone": tone.to_dict() if tone is not None else None,
              "precision": prior.precision}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.npy"
        np.save(path, codes.numpy().astype(codes_dtype(prior.model.config.vocab_size)))
        tracking.log_json(run_id, record, f"generated/{name}.json")
        tracking.log_artifact(run_id, path, "generated")
    tracking.client().set_tag(run_id, LATEST_TAG, name)
    images = None
    if tokenizer is not None:
        images = decode_and_log(tokenizer, codes, run_id, name, out_dir,
                                where=f"--run_id {run_id} generated/{name}.npy", tone=tone,
                                progress=progress)
    if frames is not None:
        log_gif(frames, tokenizer, tone, run_id, f"generated/{name}.gif", out_dir, "sampling.gif")
    return Generated(codes, name, seconds, images, tone, run_id, sampling, generation, names,
                     record)


def more_draws(run_id, seeds, num_samples=64, batch_size=None, labels=None, device=None,
               tone=None, precision="auto", progress=True, **settings):
    """Decoded images of the same sampling settings under each of `seeds`, nothing logged:
    further draws for quality figures averaged over draws, mapped by the ToneCurve `tone` when
    given (generate's, for the same settings). -> [(N, C, S, S) floats]"""
    prior = LoadedPrior(run_id, pick_device(device), precision=precision)
    label_ids, num_samples = prior.label_ids(labels, num_samples)
    return draws_of(prior.model, prior.tokenizer(), seeds, num_samples, label_ids, batch_size,
                    tone, prior.precision, progress, **settings)


def draws_of(model, tokenizer, seeds, num_samples, label_ids=None, batch_size=None, tone=None,
             precision="fp32", progress=True, **settings):
    """more_draws for a model already loaded (a prior's, or several priors' drawn as one);
    precision resolved (the tokenizer decodes in its own). progress: one bar (pipeline/
    progress.py) over all the draws' grids."""
    device = next(model.parameters()).device
    seeds = list(seeds)
    draws = []
    with progress_bar(len(seeds) * num_samples, "quality draws", "grid", progress) as bar:
        for seed in seeds:
            generator = torch.Generator(device=device).manual_seed(seed)
            draws.append(tokenizer.decode(sample_tokens(
                model, num_samples, batch_size or num_samples, label_ids, generator,
                precision=precision, bar=bar, **settings)))
    return [tone(draw) for draw in draws] if tone is not None else draws


def images_from_indexes(run_id=None, indexes=None, tokenizer_run_id=None, indexes_path=None,
                        out_dir=None, device=None, precision="auto", progress=True):
    """Decode a prior run's generated/<indexes>.npy, or any local file with a tokenizer run
    (decoding in `precision`, auto | fp32 | bf16, as generation does)."""
    device = pick_device(device)
    if indexes_path:
        if not tokenizer_run_id:
            raise UserError("--indexes_path needs --tokenizer_run_id (the tokenizer that "
                            "decodes it)")
        tokenizer = load_tokenizer(tokenizer_run_id, device, flag="--tokenizer_run_id",
                                   precision=precision)
        array = read_npy(indexes_path)
        name = Path(indexes_path).stem
        return decode_and_log(tokenizer, array, tokenizer.run_id, name, out_dir,
                              where=str(indexes_path), progress=progress)
    if not run_id:
        raise UserError("give --run_id <prior run> [--indexes NAME], or "
                        "--tokenizer_run_id ID --indexes_path FILE")
    run_id = tracking.resolve_run_id(run_id)
    prior_run = tracking.get_run(run_id, "prior")
    if indexes is None:
        indexes = prior_run.data.tags.get(LATEST_TAG)
    name = pick_artifact(run_id, "generated", indexes, ".npy", "--run_id")
    tokenizer_run_id = tokenizer_run_id or tracking.tokenizer_run_of(prior_run)
    if not tokenizer_run_id:
        raise UserError(f"--run_id {run_id}: the prior was trained from a local file and names "
                        f"no tokenizer; add --tokenizer_run_id ID")
    tokenizer = load_tokenizer(tokenizer_run_id, device, flag="--tokenizer_run_id",
                               precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(run_id, f"generated/{name}.npy", tmp)
        array = read_npy(path, f"--run_id {run_id} generated/{name}.npy")
    record = tracking.load_json_artifact(run_id, f"generated/{name}.json")  # logged before the .npy
    tone = ToneCurve.from_dict(record["tone"]) if record.get("tone") else None
    return decode_and_log(tokenizer, array, run_id, name, out_dir,
                          where=f"--run_id {run_id} generated/{name}.npy", tone=tone,
                          progress=progress)
