"""One command from a CSV to images: tokenizer -> quantize -> prior -> generate -> decode.

Everything runs under one MLflow parent run, each stage a child run. A stage's settings and
inputs hash to a key (tag `pipeline.key`); running the same command again reuses the finished
run with that key, and resumes one that was interrupted, instead of training again. The CSV is
read, hashed and decoded once (images.Source) and handed down to every stage.

The tokenizer is any registered kind (`--tokenizer vqvae|pixels`, image_tokenizers/): a kind
trained by steps goes to pipeline/train_tokenizer.py, a fitted one to tokenizers.fit_tokenizer.
"""

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path


from pipeline import describe, tracking
import image_tokenizers
import priors
from priors.settings import LARGER_IMAGES
from pipeline.quality import K_NEIGHBOURS, QualityReference, report_draws, run_ceiling
from pipeline.ranking import HeldOut, link_figures, logged_model_id
from pipeline.runs import live_owner
from pipeline.tokenizers import FitConfig, fit_tokenizer, quantize
from pipeline.train_prior import TrainConfig as PriorTrainConfig, train_prior
from pipeline.train_tokenizer import KIND as TOKENIZER_KIND, TrainConfig as TokenizerTrainConfig
from pipeline.train_tokenizer import train_vqvae
from core.errors import UserError
from pipeline.device import pick_device, resolve_precision
from pipeline.budget import TimeBudget
from pipeline.generate import generate, more_draws
from pipeline.images import Source, read_source
from pipeline.visual import image_grid, save_png, save_pngs

KEY_TAG = "pipeline.key"

PRESETS = {
    # 1,500 16x16 images end to end in a few minutes on 2 CPU cores. K=64 rather than 128: a
    # smaller vocabulary is easier for the prior to learn from 1,350 sequences (FD ratio 1.72
    # vs 1.92, PSNR 28.3 vs 29.3 dB on the demo digits). With labels the prior is
    # class-conditional and draws each class in turn (unlabelled CSVs: fit_label_settings).
    # 1,200 VQ-VAE steps (PSNR 30.1 dB, was 28.4 at 600) lifted the samples' recall from 0.82
    # to 0.88, and 2,400 steps (30.9 dB) their validation FD ratio from 1.11 to 1.02 (8 seeds);
    # 2,400 prior steps and the sampling settings were picked on the validation split with
    # experiments/sweep_sampling.py (docs/results.md).
    "small": {
        "pixels": {"image_size": 16, "mode": "levels", "bits": 4},
        "vqvae": {"image_size": 16, "channels": 64, "downsample": 4, "codebook_size": 64,
                  "batch_size": 64, "max_steps": 2400, "learning_rate": 1e-3,
                  "eval_every": 200, "checkpoint_every": 200},
        "prior": {"n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.3, "batch_size": 64,
                  "max_steps": 2400, "learning_rate": 6e-4, "weight_decay": 0.1,
                  "eval_every": 100, "checkpoint_every": 200, "conditional": True,
                  "sample_every": 400},
        "sample": {"num_samples": 300, "temperature": 1.25, "top_k": None, "top_p": None,
                   "labels": "all", "guidance": 1.3},
    },
    # a GPU: larger images, codebook and prior
    "base": {
        "pixels": {"image_size": 32, "mode": "palette", "palette_size": 512},
        "vqvae": {"image_size": 32, "channels": 128, "downsample": 4, "codebook_size": 512,
                  "batch_size": 128, "max_steps": 10000, "learning_rate": 5e-4,
                  "eval_every": 500, "checkpoint_every": 1000},
        "prior": {"n_layer": 8, "n_head": 8, "n_embd": 512, "dropout": 0.1, "batch_size": 128,
                  "max_steps": 20000, "learning_rate": 3e-4, "eval_every": 1000,
                  "checkpoint_every": 1000},
        "sample": {"num_samples": 256, "temperature": 1.0, "top_k": None, "top_p": None},
    },
    # for tests: seconds, not minutes
    "tiny": {
        "pixels": {"image_size": 16, "mode": "levels", "bits": 2},
        "vqvae": {"image_size": 16, "channels": 16, "downsample": 4, "codebook_size": 16,
                  "code_dim": 8, "n_res_blocks": 1, "batch_size": 16, "max_steps": 30,
                  "learning_rate": 3e-3, "eval_every": 15, "checkpoint_every": 15},
        "prior": {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0, "batch_size": 16,
                  "max_steps": 20, "eval_every": 10, "checkpoint_every": 10},
        "sample": {"num_samples": 64, "temperature": 1.0, "top_k": None, "top_p": None},
    },
}
# settings["sample"] goes to generate(): the generation's fields (pipeline.generate.
# GenerationConfig) and the prior family's sampling settings (priors.sampling_class), which
# refuses the ones it does not take; labels ('3,3,7' or 'all') and guidance need a conditional
# prior. These sampling settings are not --sample.<flag>s: they change the images' size, and the
# quality figures compare the samples with held-out images of the tokenizer's size.
NOT_IN_PIPELINE = LARGER_IMAGES
# The parent run's metrics; the stages' own names keep their units (val/psnr_db, ...).
METRICS = {
    "tokenizer/val/*": "the tokenizer run's last validation figures, under that run's names "
                       "(a VQ-VAE's val/psnr_db in dB, val/codebook_usage as a fraction, ...)",
    "prior/val/*": "the prior run's last validation figures, under that run's names",
    "quality/*": "means over `quality/draws` draws of the samples' size (the saved samples, "
                 "then the same settings under the next seeds); quality/<figure>_sd: the "
                 "draws' standard deviation",
    "quality/fd_ratio": "Frechet distance of the samples to held-out images over that of as "
                        "many real training images (the mean over 32 random choices of them; "
                        "in the space of tag quality.feature_space; 1 = as close as real data)",
    "quality/fd_real, fd_real_sd": "the real reference's Frechet distance to the held-out images "
                                   "(mean over 32 choices of training images) and its spread "
                                   "over those choices",
    "quality/precision, recall": "share of samples on the held-out images' manifold, share of "
                                 "held-out images on the samples' (k = 3; real_precision and "
                                 "real_recall: the same for real training images, means over "
                                 "the same 32 choices)",
    "quality/nn_ratio": "median pixel distance of a sample to its nearest training image over "
                        "the same for held-out images (far below 1 = copies)",
    "quality/copy_fraction": "fraction of samples closer to the training set than 95% of "
                             "held-out images",
    "quality/classes_present, classifier_confidence": "with labels: classes a small CNN "
        "classifier finds among the samples, and its mean top probability",
    "quality/label_agreement": "class-conditional samples: share the classifier assigns to the "
                               "class they were drawn for",
    "time/*_s": "wall time of each stage in seconds (time/sampling_codes_per_s: codes/s)",
}


# The trainers of the tokenizer kinds trained by steps (image_tokenizers/base.py: fitted False);
# fitted kinds all share tokenizers.fit_tokenizer.
STEP_TRAINERS = {TOKENIZER_KIND: (TokenizerTrainConfig, train_vqvae)}


def tokenizer_trainer(kind):
    """(train config class, train function) for tokenizer kind `kind`: fitted kinds are fitted
    in one pass (tokenizers.fit_tokenizer), the others trained by steps
    (pipeline/train_tokenizer.py). The function takes (model_flags, train_flags,
    resume_run_id=None, parent_run_id=None, tags=None, source=None)."""
    if image_tokenizers.kind(kind).Model.fitted:
        def fit(model_flags=None, train_flags=None, resume_run_id=None, parent_run_id=None,
                tags=None, source=None):
            # a fitted run never writes last.pt, so find_stage_run never asks to resume one
            return fit_tokenizer(kind, model_flags, train_flags, parent_run_id, tags, source,
                                 codes_name="train")
        return FitConfig, fit
    if kind not in STEP_TRAINERS:
        raise UserError(f"--tokenizer {kind} is trained by steps, and no trainer is registered "
                        f"for it in pipeline/run.py STEP_TRAINERS")
    return STEP_TRAINERS[kind]


def has_field(config_class, name):
    return name in {f.name for f in dataclasses.fields(config_class)}


def stage_key(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def precision_key(resolved):
    """The part a stage's key takes from its resolved precision: none for fp32, so the stages
    trained before --precision existed (all fp32 on a CPU) keep their keys and are reused."""
    return () if resolved == "fp32" else ({"precision": resolved},)


def find_stage_run(key, experiment):
    """-> ("reuse" | "resume" | "new", run_id or None) for the stage with this key."""
    runs = tracking.client().search_runs([tracking.experiment_id(experiment)],
                                         filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                                         order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if run.info.status == "FINISHED":
            return "reuse", run.info.run_id
    for run in runs:  # interrupted (killed: still RUNNING; crashed: FAILED) with a checkpoint,
        # or training in another process right now: resuming it then stops, naming that process
        if live_owner(run) or "checkpoints/last.pt" in tracking.list_artifacts(
                run.info.run_id, "checkpoints"):
            return "resume", run.info.run_id
    return "new", None


def run_stage(name, key, experiment, train_fn, model_flags, train_flags, parent_run_id,
              **inputs):
    """Reuse, resume or start the stage's run; `inputs` (e.g. the read CSV) go to train_fn."""
    action, run_id = find_stage_run(key, experiment)
    print(f"[{name}] {'reusing finished' if action == 'reuse' else action} run "
          f"{run_id or ''}".rstrip(), file=sys.stderr)
    if action == "reuse":
        return run_id, action
    if action == "resume":
        return train_fn(resume_run_id=run_id, train_flags={}, **inputs), action
    run_id = train_fn(model_flags, train_flags, parent_run_id=parent_run_id,
                      tags={KEY_TAG: key}, **inputs)
    return run_id, action


def fit_label_settings(settings, overrides, has_labels):
    """Fit the preset's class-conditional settings to the data: without labels (a CSV's label
    column, a folder's class subfolders) the prior is unconditional, and an unconditional prior samples without labels or guidance.
    Label settings the user gave for data without labels are an error. -> the names dropped."""
    def given(stage, key):
        return key in overrides.get(stage, {})
    if not has_labels:
        asked = [f"--{stage}.{key}" for stage, key in (("prior", "conditional"),
                 ("sample", "labels"), ("sample", "guidance"))
                 if given(stage, key) and overrides[stage][key] not in (None, False)]
        if asked:
            raise UserError(f"{', '.join(asked)}: the data has no labels (a CSV's label "
                            f"column, a folder's class subfolders)")
    dropped = []
    prior = settings["prior"]
    if not has_labels and prior.get("conditional") and not given("prior", "conditional"):
        prior["conditional"] = False
        dropped.append("prior.conditional")
    if not prior.get("conditional"):
        for key in ("labels", "guidance"):
            if settings["sample"].get(key) is not None and not given("sample", key):
                settings["sample"][key] = None
                dropped.append(f"sample.{key}")
    return dropped


def split_flags(flags, *config_classes):
    return [{k: v for k, v in flags.items() if k in {f for f in cls.__dataclass_fields__}}
            for cls in config_classes]


def tokenizer_split(tokenizer_run_id, source):
    """(the ImageData a tokenizer run encoded, (its training rows, its validation rows)), from
    the read CSV and the settings the run recorded: the same objects the trainer used when
    `source` is the one it read (images.Source keeps them)."""
    config = tracking.load_json_artifact(tokenizer_run_id, "config.json")
    model, train = config["model"], config["train"]
    data = source.images(model["in_channels"], model["image_size"],
                         train.get("skip_bad_images", False))
    return data, source.split(train["val_fraction"], train["seed"], data)


def load_split_images(tokenizer_run_id, source, heldout=None):
    """(real images, held-out images, real labels, held-out labels) as floats in [0, 1] at the
    tokenizer's image size: what the quality figures are judged by. `source` and `heldout` are
    the CSVs, read (images.Source) or as paths. Without `heldout`, the tokenizer's validation
    split is held out and its training split is the real data. With it, every row of the
    training CSV is real data, so the judge depends on the data alone and not on the --seed
    that drew the split. Labels are None when the data has no labels. (The pipeline uses
    judged_images, which keeps the images uint8, 4x smaller: QualityReference takes either.)"""
    source = source if isinstance(source, Source) else read_source(source)
    if heldout is not None and not isinstance(heldout, Source):
        heldout = read_source(heldout)
    real, judged, labels, judged_labels = judged_images(*tokenizer_split(tokenizer_run_id,
                                                                         source), heldout)
    return real.float() / 255, judged.float() / 255, labels, judged_labels


def judged_images(data, split, heldout=None):
    """load_split_images, with the images uint8 (N, C, S, S) as decoded, from the tokenizer's
    ImageData and (training rows, validation rows) (tokenizer_split) and the held-out CSV (a
    Source, or None)."""
    train_idx, val_idx = split
    load = lambda d, idx: d.gather(idx)
    if heldout is not None:
        train_idx = range(len(data))
        heldout_data = heldout.images(data.channels, data.size)
        heldout_images = load(heldout_data, range(len(heldout_data)))
        heldout_labels = heldout_data.table.labels
    else:
        heldout_images = load(data, val_idx)
        heldout_labels = None if data.table.labels is None else [data.table.labels[i]
                                                                 for i in val_idx]
    labels = None if data.table.labels is None else [data.table.labels[i] for i in train_idx]
    return load(data, train_idx), heldout_images, labels, heldout_labels


def describe_pipeline(preset, path_to_data, settings, command, stages=None, kind="vqvae"):
    """The parent run's description; `stages` ({stage: (name, run id, action)}) once known."""
    notes = [f"- {stage}: `{name}`, run `{run_id}` ({action})"
             for stage, (name, run_id, action) in (stages or {}).items()]
    return describe.description(
        f"Pipeline, preset {preset}: {kind} tokenizer -> codes -> prior -> "
        f"{settings['sample']['num_samples']} samples, judged against held-out images",
        command=command, data=f"`{path_to_data}` (under *Datasets*)", metrics=METRICS,
        artifacts={"summary.json": "run ids, settings, metrics and timings (also written to "
                                   "the output folder with samples/*.png and grid.png)"},
        notes=["Child runs (expand this run in the runs list):", "", *notes] if notes else ())


def check_quality_sizes(source, settings, heldout, train_config):
    """Fail before any training when the quality figures could not be computed: their
    k-nearest-neighbour radii need more than K_NEIGHBOURS samples and held-out images.
    source, heldout: the read CSVs (heldout None: the tokenizer's validation split is held
    out); train_config: the tokenizer trainer's config class (its default val_fraction)."""
    fraction = settings["tokenizer"].get("val_fraction", train_config.val_fraction)
    train_rows, val_rows = source.split(fraction, settings["tokenizer"]["seed"])
    split = f"split of {source.table.data_path} (--tokenizer.val_fraction {fraction})"
    if heldout is not None:
        counts = {f"the training {split}": len(train_rows),
                  str(heldout.table.data_path): len(heldout.table.paths)}
    else:
        counts = {f"the training {split}": len(train_rows),
                  f"the validation {split}": len(val_rows)}
    for where, n in counts.items():  # (rows --skip_bad_images drops are still counted)
        if n <= K_NEIGHBOURS:
            raise UserError(f"{where}: {n} images; the quality figures need more than "
                            f"{K_NEIGHBOURS}")
    labels = settings["sample"].get("labels")
    n_samples = (len(str(labels).split(",")) if labels not in (None, "all")
                 else settings["sample"]["num_samples"])  # a list of labels is one sample each
    if n_samples <= K_NEIGHBOURS:
        raise UserError(f"{n_samples} samples (--sample.num_samples or --sample.labels): the "
                        f"quality figures need more than {K_NEIGHBOURS}")


def run_pipeline(path_to_data, out_dir, preset="small", overrides=None, experiment=None,
                 heldout_csv=None, seed=0, register=None, data_name=None, command=None,
                 quality_draws=8, tokenizer="vqvae", precision="auto", minutes=None,
                 system_metrics=False):
    """Run (or reuse) every stage; writes out_dir/samples/*.png, grid.png, summary.json.
    The quality figures are means over `quality_draws` draws of the samples' size (the first
    draw is the saved samples).
    With `register`, the prior's MLflow Model becomes a new version of that registered model,
    once the quality step has judged it: @champion when its FD ratio beats the champion's on the
    same held-out images, else @challenger (pipeline/ranking.py). data_name names the data in
    the parent run's name (default: the CSV's folder/stem); command is the command line
    recorded in its description (default: this process's). tokenizer: the tokenizer kind
    (image_tokenizers/); `overrides["tokenizer"]` holds its flags. precision: auto | fp32 | bf16 for every stage (training, quantizing,
    sampling, the ceiling's reconstructions), each resolving it for its device
    (pipeline/device.py) and recording the result as its param `precision`. minutes: a time
    budget for the whole command (pipeline/budget.py), None for the stages' step budgets.
    system_metrics: the training stages log the machine's figures (--system_metrics; it does
    not change a model, so it is no part of a stage's key)."""

    if preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got '{preset}'")
    if quality_draws < 1:
        raise UserError(f"--quality_draws must be at least 1, got {quality_draws}")
    budget = TimeBudget(minutes) if minutes is not None else None  # the clock starts here
    if system_metrics:
        tracking.require_psutil()  # before any run is created
    budget_key = (budget.key(),) if budget else ()
    kind = image_tokenizers.kind(tokenizer)  # an unknown kind fails before any run is created
    train_config, train_tokenizer = tokenizer_trainer(tokenizer)
    # every CSV is read and validated here, once, and handed down (images.Source)
    source = read_source(path_to_data)
    table = source.table
    heldout = read_source(heldout_csv) if heldout_csv else None
    out_dir = Path(out_dir)
    overrides = overrides or {}
    unknown = set(overrides) - {"tokenizer", "prior", "sample"}
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(sorted(unknown))} in the overrides; the "
                        f"stages are tokenizer, prior and sample")
    presets = {**PRESETS[preset], "tokenizer": PRESETS[preset].get(tokenizer, {})}
    settings = {stage: {"seed": seed, **presets[stage], **overrides.get(stage, {})}
                for stage in ("tokenizer", "prior", "sample")}
    dropped = fit_label_settings(settings, overrides, table.labels is not None)
    check_quality_sizes(source, settings, heldout, train_config)
    if dropped:
        print(f"left out the preset's {', '.join(dropped)}: " + (
            f"{path_to_data} has no {table.label_source}" if table.labels is None else
            "the prior is unconditional"), file=sys.stderr)
    csv_hash = source.sha256
    # what --precision becomes on each stage's device: it keys the stages (precision_key), and
    # the parent records the one sampling and the judge's reconstructions run in
    resolved = {stage: resolve_precision(precision, pick_device(settings[stage].get("device")))
                for stage in ("tokenizer", "prior")}
    sample_precision = resolve_precision(precision, pick_device())
    timings, started = {}, time.perf_counter()

    csv = Path(path_to_data)
    name = describe.run_name("pipeline", preset,
                             data_name or f"{csv.resolve().parent.name}/{csv.stem}")
    command = command or describe.process_command()
    note = describe_pipeline(preset, path_to_data, settings, command, kind=tokenizer)
    parent = tracking.create_run("pipeline", experiment, run_name=name, tags=describe.source_tags(
        {"pipeline.preset": preset, describe.NOTE_TAG: note}))
    tracking.log_params(parent, describe.run_params(
        {"path_to_data": str(path_to_data), "preset": preset, "tokenizer": tokenizer,
         "precision": sample_precision, "minutes": minutes},
        {f"{s}.{k}": v for s, f in settings.items() for k, v in f.items()}))
    inputs = describe.csv_inputs(table.data_path, csv_hash, {"training": range(len(table.paths))})
    if heldout is not None:
        inputs += describe.csv_inputs(heldout.table.data_path, heldout.sha256,
                                      {"evaluation": range(len(heldout.table.paths))})
    describe.log_inputs(parent, inputs)
    status = "FAILED"
    try:
        # 1. the tokenizer (any kind: trained by steps or fitted)
        t0 = time.perf_counter()
        tok_model, tok_train = split_flags(settings["tokenizer"], kind.Config, train_config)
        tok_train = {**tok_train, "path_to_data": str(path_to_data), "experiment": experiment}
        tok_key = stage_key(tokenizer, csv_hash, tok_model,
                            {k: v for k, v in tok_train.items()
                             if k not in ("path_to_data", "experiment")},
                            *precision_key(resolved["tokenizer"]),
                            *(budget_key if has_field(train_config, "max_minutes") else ()))
        if budget and has_field(train_config, "max_minutes") and "max_minutes" not in tok_train:
            tok_train["max_minutes"] = budget.tokenizer_minutes()
        tok_train["precision"] = precision  # (not keyed as given: auto may mean either)
        if system_metrics and has_field(train_config, "system_metrics"):  # (fitted kinds: none)
            tok_train["system_metrics"] = True
        tok_run, tok_action = run_stage(tokenizer, tok_key, experiment, train_tokenizer,
                                        tok_model, tok_train, parent, source=source)
        timings["tokenizer_s"] = time.perf_counter() - t0

        # 1b. the tokenizer's ceiling: the quality figures a perfect prior over its codes would
        # reach (pipeline.quality.tokenizer_ceiling), logged on the tokenizer run
        t0 = time.perf_counter()
        tok_data, split = tokenizer_split(tok_run, source)  # also the prior's split, below
        train_images, heldout_images, labels, heldout_labels = judged_images(tok_data, split,
                                                                             heldout)
        # the judge's own seed is fixed: --seed re-draws the training, not the yardstick (with
        # --seed 1 it had moved one prior's FD ratio from 1.43 to 1.26)
        reference = QualityReference(heldout_images, train_images, labels, heldout_labels)
        ceiling, tok_step = run_ceiling(tok_run, reference, sample_precision)
        ceiling = {f"ceiling/{k}": v for k, v in ceiling.items() if isinstance(v, (int, float))}
        if "ceiling/fd_ratio" not in tracking.client().get_run(tok_run).data.metrics:  # reused
            tracking.log_metrics(tok_run, ceiling, step=tok_step)
        timings["ceiling_s"] = time.perf_counter() - t0

        # 2. quantize (skipped when the run already holds codes of this very CSV)
        t0 = time.perf_counter()
        existing = [p for p in tracking.list_artifacts(tok_run, "codes") if p == "codes/train.npy"]
        if not existing or tracking.load_json_artifact(
                tok_run, "codes/train.json")["csv_sha256"] != csv_hash:
            quantize(tok_run, name="train", source=source, precision=precision)
        timings["quantize_s"] = time.perf_counter() - t0

        # 3. prior
        t0 = time.perf_counter()
        family = priors.family(settings["prior"].get("prior", "gpt"))
        pr_model, pr_train = split_flags(settings["prior"], family.Config, PriorTrainConfig)
        # the prior holds out the tokenizer's validation rows: its split is handed down
        pr_train = {**pr_train, "run_id": tok_run, "codes": "train", "experiment": experiment,
                    "register": None,
                    "val_fraction": settings["tokenizer"].get("val_fraction",
                                                              train_config.val_fraction)}
        # (val_fraction is the tokenizer's, which its run id already fixes)
        pr_key = stage_key("prior", tok_run, csv_hash, pr_model,
                           {k: v for k, v in pr_train.items()
                            if k not in ("experiment", "register", "log_model", "val_fraction",
                                         "sample_every")},
                           *precision_key(resolved["prior"]), *budget_key)
        if budget and "max_minutes" not in pr_train:  # what the stages before it left
            pr_train["max_minutes"] = budget.prior_minutes()
        pr_train["precision"] = precision
        if system_metrics:
            pr_train["system_metrics"] = True
        prior_run, prior_action = run_stage("prior", pr_key, experiment, train_prior, pr_model,
                                            pr_train, parent, split=split)
        timings["prior_s"] = time.perf_counter() - t0

        # 4. generate and decode (cheap: always fresh, so the samples match this invocation)
        t0 = time.perf_counter()
        generated = generate(prior_run, name=f"pipeline-{parent[:8]}", precision=precision,
                             time_limit_s=budget.generate_seconds() if budget else None,
                             **settings["sample"])
        name, images, tone, drawn = generated.name, generated.images, generated.tone, \
            generated.generation
        samples_dir = out_dir / "samples"
        if samples_dir.is_dir():  # a previous, possibly larger, set must not mix in
            for old in samples_dir.glob("sample_*.png"):
                old.unlink()
        save_pngs(images, samples_dir)
        requested = generated.labels  # the class drawn for each sample, as the .json records
        save_png(sample_grid(images, requested, drawn.labels), out_dir / "grid.png")
        timings["generate_s"] = time.perf_counter() - t0
        timings["sampling_codes_per_s"] = generated.codes.numel() / generated.seconds

        # 5. quality, against held-out real images: the mean over `quality_draws` draws (the
        # saved samples, then the same settings under seeds seed+1, ...), with their spread
        t0 = time.perf_counter()
        draws = [images]
        if budget:  # a draw: its sampling, and about half that again to decode and judge it
            fit = budget.draws_that_fit(quality_draws, 1.5 * generated.seconds)
            if fit < quality_draws:
                print(f"--minutes {minutes}: {fit} quality draw(s) of {quality_draws} fit in the "
                      f"time left", file=sys.stderr)
            quality_draws = fit
        if quality_draws > 1:
            # the prior's tone curve for these settings maps every draw, as it maps the saved ones
            draws += more_draws(prior_run, range(drawn.seed + 1, drawn.seed + quality_draws),
                                drawn.num_samples, drawn.batch_size, drawn.labels, tone=tone,
                                precision=precision, **dataclasses.asdict(generated.sampling))
        quality = report_draws(reference, draws, requested)
        timings["quality_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started

        runs = {"tokenizer": tracking.client().get_run(tok_run),
                "prior": tracking.client().get_run(prior_run)}
        metrics = {**{f"{stage}/{k}": v for stage, run in runs.items()
                      for k, v in run.data.metrics.items() if k.startswith("val/")},
                   **{f"quality/{k}": v for k, v in quality.items() if isinstance(v, (int, float))},
                   **ceiling}
        # the held-out images the figures were judged on: the held-out CSV, else the
        # tokenizer's validation split (the digest of the tokenizer run's validation input)
        judged_input = (describe.csv_inputs(heldout.table.data_path, heldout.sha256,
                                            {"evaluation": range(len(heldout.table.paths))})
                        if heldout is not None else
                        describe.csv_inputs(table.data_path, csv_hash, {"evaluation": split[1]}))[0]
        if heldout is None:
            describe.log_inputs(parent, [judged_input])
        version = alias = None
        if register:  # after the quality step: @champion moves only to a better version
            from pipeline.served import register_prior
            version, alias = register_prior(prior_run, register, HeldOut(
                judged_input, reference, quality["fd_ratio"], drawn.num_samples, quality_draws,
                drawn.seed, precision, experiment))
        # the figures name that data set and the prior's logged model: the Models tab ranks
        judged = {k: v for k, v in metrics.items() if k.startswith(("quality/", "ceiling/"))}
        link_figures(parent, judged, judged_input.dataset, logged_model_id(prior_run),
                     reference=reference.fingerprint)
        tracking.log_metrics(parent, {**{k: v for k, v in metrics.items() if k not in judged},
                                      **{f"time/{k}": v for k, v in timings.items()}}, step=0)
        tracking.client().set_tag(parent, tracking.TOKENIZER_RUN_TAG, tok_run)
        tracking.client().set_tag(parent, "pipeline.prior_run_id", prior_run)
        tracking.client().set_tag(parent, "quality.feature_space", quality["feature_space"])
        tracking.client().set_tag(parent, "quality.tone_matched", str(tone is not None).lower())
        actions = {"tokenizer": tok_action, "prior": prior_action}
        tracking.client().set_tag(parent, describe.NOTE_TAG, describe_pipeline(
            preset, path_to_data, settings, command,
            {stage: (run.info.run_name, run.info.run_id, actions[stage])
             for stage, run in runs.items()}, kind=tokenizer))
        summary = {"pipeline_run_id": parent, "tokenizer_run_id": tok_run,
                   "prior_run_id": prior_run, "tokenizer": tokenizer, "stages": actions,
                   "registered_model": f"models:/{register}/{version}" if register else None,
                   "registered_alias": alias,
                   "generated": f"generated/{name}.npy", "samples_dir": str(samples_dir),
                   "grid": str(out_dir / "grid.png"), "preset": preset, "settings": settings,
                   "metrics": metrics, "class_counts": quality.get("class_counts"),
                   "feature_space": quality["feature_space"], "tone_matched": tone is not None,
                   "timings": timings, "precision": sample_precision, "minutes": minutes,
                   "tracking_uri": tracking.tracking_uri(),
                   "experiment_id": tracking.client().get_run(parent).info.experiment_id}
        _write_json(out_dir / "summary.json", summary)
        tracking.log_json(parent, summary, "summary.json")
        status = "FINISHED"
        return summary
    finally:
        tracking.end_run(parent, status)


def sample_grid(images, requested=None, labels_spec=None, rows=8):
    """The first samples, 8 to a row; with --sample.labels all (classes in turn), one column
    per class, so each column shows one class's variety."""
    classes = sorted(set(requested)) if requested else []
    ncol = len(classes) if labels_spec == "all" and 1 < len(classes) <= 16 else 8
    return image_grid(images[:ncol * rows], ncol=ncol)


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
