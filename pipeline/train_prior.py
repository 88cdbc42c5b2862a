"""Training any prior on a tokenizer run's token grids, tracked in MLflow. One loop for every
family (`--prior NAME`, see priors/__init__.py): pipeline/train_loop.py's.

Tokens come from a tokenizer run's `codes/<name>.npy` (with its `.json` metadata: vocabulary,
grid, image geometry, labels), or from a local .npy with `--codebook_size`. Validation reports
the prior's `nll` on the held-out rows in nats per token and in bits per image dimension
(pixels x channels, comparable across tokenizers and priors); for absorbing diffusion that nll
is the ELBO, estimated with a fixed seed so evaluations compare.
"""

import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch

import priors
from pipeline import describe, distributed, tracking, train_loop
from pipeline.codes import load_codes_file, load_run_codes
from core.config import build, field, from_record
from pipeline.device import PRECISION_HELP, autocast, needs_grad_scaler, resolve_precision
from core.errors import UserError
from pipeline.generate import sample_tokens
from pipeline.images import split_indices
from pipeline.runs import TrainingRun, recorded_config
from pipeline.tokenizers import load_tokenizer
from pipeline.train_loop import apply_gradients, check_finite, check_settings
from pipeline.visual import image_grid

STAGE = "prior"
SAMPLES_KEY = "training_samples"  # not `samples`: generations log theirs at step 0 of the run
SAMPLE_ROWS = 8  # of the training_samples grid: 8 per class (or 8 columns, unconditional)
# Named like the tokenizer's: quantity and unit, so the stages never share a chart by accident.
METRICS = {
    "train/nats_per_token": "training objective per batch: mean negative log-likelihood of a "
                            "token, in nats (absorbing: its weighted masked-token loss)",
    "train/lr": "learning rate",
    "train/tokens_per_sec": "training throughput, tokens/s over all processes",
    "val/nats_per_token": "negative log-likelihood of the validation split per token, in nats "
                          "(absorbing: the ELBO bound); its minimum picks checkpoints/best.pt",
    "val/bits_per_dim": "the same per image dimension (pixels x channels), in bits: comparable "
                        "across tokenizers and priors",
    "heldout/<name>/bits_per_dim": "added by `python -m pipeline evaluate` on another CSV",
}


@dataclass
class TrainConfig:
    prior: str = field("gpt", "prior family: " + ", ".join(priors.FAMILIES))
    run_id: Optional[str] = field(None, "tokenizer run whose codes/<codes>.npy to train on")
    codes: Optional[str] = field(None, "name of the codes artifact (default: the only/first one)")
    path_to_data: Optional[str] = field(None, "a local codes .npy (N, h, w) instead of a run")
    codebook_size: Optional[int] = field(None, "vocabulary size K, required with --path_to_data")
    conditional: bool = field(False, "condition on the labels (a CSV's `label` column, a "
                                     "folder's class subfolders; recorded with the codes), "
                                     "with label dropout for guidance")
    batch_size: int = field(64, "sequences per optimizer step (the global batch)")
    accumulate: int = field(1, "split each batch into this many micro-batches (less memory, "
                               "same update)")
    max_steps: int = field(5000, "optimizer steps")
    max_minutes: Optional[float] = field(None, "also stop after this many minutes (wall time, "
                                               "validation included: equal-time comparisons); "
                                               "the learning-rate schedule then runs on the clock")
    learning_rate: float = field(6e-4, "peak AdamW learning rate (warmup, then --lr_schedule)")
    lr_schedule: str = field("cosine", "after warmup: cosine (down to --lr_decay x peak), "
                                       "constant, or step (x --lr_decay every epoch)")
    lr_decay: Optional[float] = field(None, "cosine: the last rate as a share of the peak "
                                            "(default 0.1); step: the factor per epoch "
                                            "(default 0.9)")
    epochs: Optional[float] = field(None, "train this many passes over the training split "
                                          "instead of --max_steps")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (not on norms/biases)")
    grad_clip: float = field(1.0, "clip the gradient norm to this")
    ema_decay: Optional[float] = field(None, "keep an exponential moving average of the weights "
                                             "with this decay (e.g. 0.999); evaluation, sampling "
                                             "and checkpoints' `ema` use it")
    val_fraction: float = field(0.1, "fraction of rows held out (same rows as the tokenizer's split)")
    seed: int = field(0, "seed for the split, initialisation and batch order")
    split_seed: Optional[int] = field(None, "seed for the split alone (default: --seed): another "
                                            "--seed then trains a second prior on the same "
                                            "rows, e.g. for an ensemble")
    eval_every: int = field(250, "evaluate every N steps")
    checkpoint_every: int = field(500, "write checkpoints/last.pt every N steps")
    sample_every: Optional[int] = field(None, "log a grid of samples (the same seed each time; "
                                              "a column per class) at step 0, every N steps "
                                              "and the last: the run page's "
                                              f"`{SAMPLES_KEY}` image and its step slider")
    device: Optional[str] = field(None, "cpu, cuda or cuda:N (default: cuda when available)")
    dist_timeout: float = field(distributed.DEFAULT_TIMEOUT_S, distributed.TIMEOUT_HELP)
    precision: str = field("auto", PRECISION_HELP)
    experiment: Optional[str] = field(None, "MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME)")
    checkpoint_dir: str = field("checkpoints", "local copies of checkpoints, one folder per run")
    system_metrics: bool = field(False, "log the machine's CPU, memory, disk and network use "
                                        "(and GPU with nvidia-ml-py) to the run as system/..., "
                                        "every 10 s (MLflow's monitor; needs psutil)")
    log_model: bool = field(True, "at the end, log an MLflow Model (the prior and its tokenizer, "
                                  "served by `mlflow models serve`)")
    register: Optional[str] = field(None, "also register that model under this name in the "
                                          "Model Registry: a new version, @champion if it is "
                                          "the first, else @challenger (no quality step "
                                          "ranks it: python -m pipeline --register does)")

    @property
    def rows_seed(self):
        """The seed that draws the train/validation rows."""
        return self.seed if self.split_seed is None else self.split_seed


RESUME_OVERRIDES = ("max_steps", "epochs", "max_minutes", "device", "dist_timeout", "precision",
                    "eval_every", "checkpoint_every", "checkpoint_dir", "log_model", "register",
                    "sample_every", "system_metrics")


@torch.no_grad()
def evaluate(model, tokens, labels, device, batch_size=256, seed=0, precision="fp32"):
    """Mean nll per image (nats) over `tokens` (N, h, w); a fixed generator makes Monte-Carlo
    bounds comparable between evaluations."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        batch_labels = labels[start:start + batch_size].to(device) if labels is not None else None
        with autocast(device, precision):  # (the nll is taken on fp32 outputs: priors/heads.py)
            total += model.nll(batch, batch_labels, generator=generator).float().sum().item()
    model.train(was_training)
    return total / len(tokens)


def class_names(values, where):
    """Sorted distinct labels as strings (the classes) and each row's class id."""
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise UserError(f"{where}: row {missing[0] + 1} has no label "
                        f"({len(missing)} rows without one); --conditional needs every row labelled")
    names = [str(v) for v in values]
    classes = sorted(set(names), key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c))
    index = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([index[c] for c in names], dtype=torch.long)


def load_tokens(train):
    """-> (tokens LongTensor (N, h, w), metadata dict with at least codebook_size)."""
    if train.run_id and train.path_to_data:
        raise UserError("give either --run_id (a tokenizer run) or --path_to_data (a .npy), not both")
    if train.run_id:
        return load_run_codes(train.run_id, train.codes)
    if train.path_to_data:
        if train.codebook_size is None:
            raise UserError("--path_to_data needs --codebook_size (the vocabulary size K)")
        codes = load_codes_file(train.path_to_data, train.codebook_size)
        return codes, {"codebook_size": train.codebook_size, "values_per_pixel": 1,
                       "ordered": False, "labels": None}
    raise UserError("give --run_id <tokenizer run> or --path_to_data codes.npy --codebook_size K")


def run_name(family, config):
    """'prior gpt 4L 128d K64 4x4': family, depth and width where it has them, vocabulary, grid
    (and 'cond' for a class-conditional prior)."""
    depth = getattr(config, "n_layer", None) or getattr(config, "n_layers", None)
    width = getattr(config, "n_embd", None) or getattr(config, "filters", None)
    return describe.run_name(STAGE, family, depth and f"{depth}L", width and f"{width}d",
                             f"K{config.vocab_size}", f"{config.grid_h}x{config.grid_w}",
                             "cond" if config.num_classes else None)


def run_description(family, config, train, flags, where, num_train, num_val, classes):
    """The run's description: what it is, the command that reproduces it, data, metrics."""
    grid = f"{config.grid_h}x{config.grid_w}"
    conditional = f", conditional on {len(classes)} classes" if classes else ""
    return describe.description(
        f"Prior `{family}` over {grid} grids of {config.vocab_size} token values{conditional}",
        command=describe.script_command("train.py", flags),
        started_by=describe.process_command(),
        data=f"`{where}`: {num_train:,} grids for training, {num_val:,} for validation "
             f"(val_fraction {train.val_fraction}, seed {train.rows_seed}); both under *Datasets*",
        metrics=METRICS,
        artifacts={
            "config.json": "every setting and the codes' lineage",
            "checkpoints/last.pt, best.pt": "weights-only checkpoints (config, weights, EMA "
                                            "weights when --ema_decay, optimizer, step)",
            "generator": "the MLflow Model: this prior and its tokenizer, served by `mlflow "
                         "models serve` (absent with --no-log_model)",
            "generated/<name>.npy, samples": "added by transformer_generation.py: token grids "
                                             "and their decoded images",
            "completions": "added by transformer_generation.py --complete",
            **({SAMPLES_KEY: f"Model metrics tab: the same draw (a fixed seed) from the prior "
                             f"at step 0 (untrained), every {train.sample_every} steps and "
                             f"the last; the slider picks the step"}
               if train.sample_every else {})},
        notes=["Generate: `python transformer_generation.py --run_id <this run's ID> "
               "--num_samples 16`", "",
               "Resume: `python train.py --resume_run_id <this run's ID>`"])


def sample_logger(family, tokenizer, classes, seed, precision):
    """-> log(run, model, step): the `training_samples` image at `step`, a frame of the run
    page's step slider. The same draw every time (a generator seeded by `seed`; SAMPLE_ROWS
    per class, one column each, or 8 columns for an unconditional prior), from `model` in eval
    mode with the family's default sampling settings, decoded by the codes' tokenizer (a
    RunTokenizer), so that frames differ by the training between them only."""
    ncol = len(classes) if classes and len(classes) <= 16 else 8
    count = SAMPLE_ROWS * ncol
    labels = torch.arange(count) % len(classes) if classes else None  # classes in turn
    settings = asdict(priors.sampling_settings(family, {}))

    def log(run, model, step):
        was_training = model.training
        model.eval()
        try:
            generator = torch.Generator(device=tokenizer.device).manual_seed(seed)
            codes = sample_tokens(model, count, count, labels, generator, precision=precision,
                                  **settings)
        finally:
            model.train(was_training)
        images = tokenizer.decode(codes)
        run.log_image(image_grid(images, ncol=ncol, title=f"step {step}"), SAMPLES_KEY, step)
    return log


def finish_model(run_id, train, has_tokenizer):
    """The MLflow Model at the end of a training (pipeline/served.py); a prior trained from a
    local file has no tokenizer to decode with, so it gets none."""
    if not has_tokenizer:
        return
    from pipeline.served import log_generator, register_prior
    if train.log_model:
        log_generator(run_id)
    if train.register:  # the model just logged (or a new one), as a new version
        register_prior(run_id, train.register)


def train_prior(model_flags=None, train_flags=None, resume_run_id=None, parent_run_id=None,
                tags=None, progress=True, split=None):
    """Train (or resume) a prior; returns the MLflow run id (None on torchrun ranks > 0).
    Under torchrun every process calls this; see pipeline/distributed.py. split: (training
    rows, validation rows) of the codes, as the tokenizer split its CSV (the one command passes
    it down); by default split_indices(N, --val_fraction, --split_seed or --seed), which gives
    the same rows for the same settings."""
    train_flags = train_flags or {}
    with distributed.process_group(train_flags.get("device"),
                                   train_flags.get("dist_timeout")) as ctx:
        return _train(ctx, model_flags or {}, train_flags, resume_run_id, parent_run_id, tags,
                      progress, split)


def _settings(model_flags, train_flags, resume_run_id):
    """(family module, TrainConfig, recorded config or None) from flags or the resumed run."""
    if resume_run_id:
        recorded = recorded_config(STAGE, resume_run_id)
        if "prior" not in recorded["train"]:
            raise UserError(f"--resume_run_id {resume_run_id}: this prior was trained by an "
                            f"earlier version of the toolkit; it still generates, but cannot be "
                            f"resumed: start a new training")
        overrides = {k: v for k, v in train_flags.items() if k in RESUME_OVERRIDES}
        train = build(TrainConfig, recorded["train"], overrides)
        return priors.family(train.prior), train, recorded
    name = train_flags.get("prior", "gpt")
    module = priors.family(name)
    train = build(TrainConfig, getattr(module, "TRAIN_DEFAULTS", {}), train_flags)
    return module, train, None


def _train(ctx, model_flags, train_flags, resume_run_id, parent_run_id, tags, progress,
           split=None):
    module, train, recorded = _settings(model_flags, train_flags, resume_run_id)
    train_loop.settle_budget(train, train_flags, bool(resume_run_id))
    check_settings(train, ctx.world_size)
    if train.system_metrics:
        tracking.require_psutil()
    if train.accumulate < 1 or (train.batch_size // ctx.world_size) % train.accumulate:
        raise UserError(f"--accumulate {train.accumulate} must divide each process's batch "
                        f"({train.batch_size // ctx.world_size})")

    if train.register and not train.run_id:
        raise UserError("--register needs --run_id (a tokenizer run): a prior trained from a "
                        "local file cannot decode images")
    if train.sample_every is not None and train.sample_every < 1:
        raise UserError(f"--sample_every must be at least 1, got {train.sample_every}")
    if train.sample_every and not train.run_id:
        raise UserError("--sample_every needs --run_id (a tokenizer run): a prior trained from "
                        "a local file cannot decode its samples")
    tokens, meta = load_tokens(train)
    where = (f"--run_id {train.run_id} codes/{meta.get('codes_name')}" if train.run_id
             else str(train.path_to_data))
    n, grid_h, grid_w = tokens.shape
    classes, labels = None, None
    if train.conditional:
        if meta.get("labels") is None:
            raise UserError(f"--conditional: {where} has no labels (its CSV had no `label` "
                            f"column, or its folder no class subfolders)")
        classes, labels = class_names(meta["labels"], where)
    if split is not None and sum(map(len, split)) != n:
        raise UserError(f"{where}: {n} code grids, but the split given covers "
                        f"{sum(map(len, split))} rows")
    train_idx, val_idx = split if split is not None else split_indices(
        n, train.val_fraction, train.rows_seed)
    if len(val_idx) == 0:
        print("warning: no validation split; evaluating on the training codes", file=sys.stderr)
        val_idx = train_idx
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    epoch_steps = train_loop.apply_epochs(train, len(train_idx))
    train_tokens, val_tokens = tokens[train_idx], tokens[val_idx]
    train_labels = labels[train_idx] if labels is not None else None
    val_labels = labels[val_idx] if labels is not None else None
    data_fields = {"vocab_size": meta["codebook_size"], "grid_h": grid_h, "grid_w": grid_w,
                   "ordered": bool(meta.get("ordered", False)),
                   "num_classes": len(classes) if classes else 0}
    data_fields["channels"] = int(meta.get("values_per_pixel", 1))
    model_config = (from_record(module.Config, recorded["model"]) if recorded else
                    build(module.Config, model_flags, data_fields))
    # bits per image dimension need the image geometry (known when the codes came from a run)
    image_dims = (meta["in_channels"] * meta["image_size"] ** 2
                  if "image_size" in meta and "in_channels" in meta else None)

    device = ctx.device
    precision = resolve_precision(train.precision, device)  # the param records this
    log_samples = None
    if train.sample_every and ctx.is_main:  # (building the tokenizer draws from the global
        # RNG: before the seed that initialises the prior, which then trains as without it)
        log_samples = sample_logger(module.Model.family,
                                    load_tokenizer(train.run_id, device, precision=precision),
                                    classes, train.seed, precision)
    torch.manual_seed(train.seed)  # the same initial weights on every rank
    model = module.Model(model_config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.learning_rate, betas=(0.9, 0.95),
                                  fused=True)  # one kernel for all tensors: 4% off a CPU step
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, precision))
    generator = torch.Generator().manual_seed(train.seed)  # batch order, identical on all ranks
    lineage = {"tokenizer_run_id": meta.get("tokenizer_run_id"),
               "tokenizer": meta.get("tokenizer"), "codes_name": meta.get("codes_name"),
               "codebook_size": meta["codebook_size"], "grid": [grid_h, grid_w],
               "image_size": meta.get("image_size"), "in_channels": meta.get("in_channels"),
               "values_per_pixel": meta.get("values_per_pixel", 1), "classes": classes,
               # the training split's, in class order: tone matching draws in these proportions
               "class_counts": (train_labels.bincount(minlength=len(classes)).tolist()
                                if classes else None)}

    family = module.Model.family

    def start_run():
        run_tags = {tracking.PRIOR_TAG: family, **(tags or {})}
        if lineage["tokenizer_run_id"]:
            run_tags[tracking.TOKENIZER_RUN_TAG] = lineage["tokenizer_run_id"]
        config = {"model": asdict(model_config), "train": asdict(train), "data": lineage}
        params = {**asdict(train), **asdict(model_config), "num_sequences": n,
                  "world_size": ctx.world_size, "precision": precision}
        splits = {"training": train_idx.tolist(), "validation": val_idx.tolist()}
        datasets = (describe.codes_inputs(lineage["tokenizer_run_id"], meta["codes_name"], meta,
                                          tokens, splits) if train.run_id else
                    describe.npy_inputs(train.path_to_data, tokens, splits))
        note = run_description(family, model_config, train, {**train_flags, **model_flags},
                               where, len(train_idx), len(val_idx), classes)
        return TrainingRun.start(STAGE, config, params, train.checkpoint_dir, train.experiment,
                                 run_name=run_name(family, model_config), tags=run_tags,
                                 parent_run_id=parent_run_id, description=note,
                                 datasets=datasets)

    state, _ = train_loop.open_run(ctx, STAGE, "prior", train, model, optimizer, generator,
                                   resume_run_id, start_run)
    ddp_model = distributed.wrap(ctx, model)
    if ctx.enabled:
        torch.manual_seed(train.seed + ctx.rank)  # different dropout masks on different ranks

    def take_step(step, lr):
        # every rank draws the same global batch and trains on its slice of it
        pick = distributed.shard(ctx, torch.randint(len(train_tokens), (train.batch_size,),
                                                     generator=generator))
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i, micro in enumerate(pick.chunk(train.accumulate)):
            batch = train_tokens[micro].to(device, non_blocking=True)
            batch_labels = train_labels[micro].to(device) if train_labels is not None else None
            last = i == train.accumulate - 1
            with distributed.no_sync(ctx, ddp_model, sync=last), autocast(device, precision):
                _, loss = ddp_model(batch, batch_labels)
                scaler.scale(loss / train.accumulate).backward()
            loss_sum = loss_sum + loss.detach() / train.accumulate
        mean_loss = distributed.mean(ctx, loss_sum)  # every rank stops on a NaN anywhere
        check_finite(mean_loss, state.run_id, step)
        apply_gradients(model, optimizer, scaler, train.grad_clip)
        return {"train/nats_per_token": mean_loss}, len(pick) * tokens[0].numel() * ctx.world_size

    def validate(evaluated):
        val_nll = evaluate(evaluated, val_tokens, val_labels, device, seed=train.seed,
                           precision=precision)
        metrics = {"val/nats_per_token": val_nll / tokens[0].numel()}
        if image_dims:
            metrics["val/bits_per_dim"] = val_nll / (image_dims * math.log(2))
        return metrics, val_nll  # the nll per image picks best.pt

    def summary(metrics):
        return (f"val {metrics['val/nats_per_token']:.4f} nats/token"
                + (f", {metrics['val/bits_per_dim']:.4f} bits/dim" if image_dims else ""))

    def sample_frame(run, model, step, final=False):  # step 0: the untrained prior
        if log_samples is not None and (step % train.sample_every == 0 or final):
            log_samples(run, model, step)

    trainer = train_loop.Trainer(
        label=f"prior ({family})", unit="tokens", loss="train/nats_per_token", loss_digits=3,
        step=take_step, evaluate=validate, summary=summary,
        checkpoint=lambda: {"kind": "prior", "family": family, "config": asdict(model_config),
                            "data": lineage},
        begin=lambda run, model: sample_frame(run, model, 0), after_step=sample_frame,
        epoch_steps=epoch_steps)
    with tracking.system_metrics(state.run_id if ctx.is_main and train.system_metrics else None):
        run_id = train_loop.loop(ctx, trainer, train, model, optimizer, generator, state,
                                 progress)
    if ctx.is_main:
        finish_model(run_id, train, bool(lineage["tokenizer_run_id"]))
    return run_id
