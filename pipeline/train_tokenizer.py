"""Training a VQ-VAE on a CSV of images, tracked in MLflow, in the loop of pipeline/train_loop.py
(the VQ-VAE's own: the adversary, codebook metrics, reconstructions, deferred codebook updates)."""

import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from pipeline import describe, distributed, tone, tracking, train_loop
from core.config import build, field
from pipeline.device import PRECISION_HELP, autocast, needs_grad_scaler, resolve_precision
from core.errors import UserError
from pipeline.images import read_source
from pipeline.runs import TrainingRun, recorded_config
from pipeline.train_loop import apply_gradients, check_finite, check_settings
from pipeline.visual import reconstruction_grid
from vqvae.discriminator import (DiscriminatorConfig, PatchDiscriminator, adaptive_weight,
                                 discriminator_loss, generator_loss)
from vqvae.model import VQVAE, VQVAEConfig

STAGE, KIND = "tokenizer", "vqvae"
# Metric names say their stage's quantity and unit, so that runs of several stages can share a
# chart (the prior logs train/ and val/nats_per_token, val/bits_per_dim).
METRICS = {
    "train/vq_loss": "training objective per batch: reconstruction MSE on the [-1, 1] pixel "
                     "scale + commitment x beta (no unit)",
    "train/lr": "learning rate",
    "train/images_per_sec": "training throughput, images/s over all processes",
    "val/vq_loss": "the training objective on the validation split; its minimum picks "
                   "checkpoints/best.pt",
    "val/pixel_mse": "mean squared error per pixel, pixels in [0, 1]",
    "val/psnr_db": "peak signal-to-noise ratio, 10 log10(1 / pixel_mse), in dB (higher is better)",
    "val/codebook_usage": "fraction of the K codes used on the validation split",
    "val/codebook_perplexity": "exp(entropy of code use) on the validation split: the effective "
                               "number of codes, at most K",
}
ADVERSARIAL_METRICS = {
    "train/generator_loss": "the decoder's adversarial (hinge) loss; the objective adds "
                            "--adversarial_weight x train/adaptive_weight x this",
    "train/adaptive_weight": "the ratio of the reconstruction and adversarial gradient norms at "
                             "the decoder's last layer (Esser et al. 2021)",
    "train/discriminator_loss": "the patch discriminator's hinge loss",
    "train/logits_real": "the discriminator's mean logit on real images",
    "train/logits_fake": "its mean logit on reconstructions",
}


@dataclass
class TrainConfig:
    path_to_data: str = field("", "CSV with an image_path column (and optionally label), or "
                                  "a folder of images (class subfolders label them)")
    in_channels: Optional[int] = field(None, "1 (grayscale) or 3 (RGB); detected when unset")
    batch_size: int = field(64, "images per optimizer step (the global batch under torchrun)")
    accumulate: int = field(1, "micro-batches per optimizer step: each process's share of "
                               "--batch_size is split into this many, gradients summed")
    max_steps: int = field(5000, "optimizer steps")
    max_minutes: Optional[float] = field(None, "also stop after this many minutes (wall time, "
                                               "validation included); the learning-rate "
                                               "schedule then follows the clock")
    learning_rate: float = field(1e-3, "peak AdamW learning rate (warmup, then --lr_schedule)")
    lr_schedule: str = field("cosine", "after warmup: cosine (down to --lr_decay x peak), "
                                       "constant, or step (x --lr_decay every epoch)")
    lr_decay: Optional[float] = field(None, "cosine: the last rate as a share of the peak "
                                            "(default 0.1); step: the factor per epoch "
                                            "(default 0.9)")
    epochs: Optional[float] = field(None, "train this many passes over the training split "
                                          "instead of --max_steps")
    weight_decay: float = field(0.0, "AdamW weight decay")
    grad_clip: float = field(1.0, "clip the gradient norm to this")
    ema_decay: Optional[float] = field(None, "keep an exponential moving average of the weights "
                                             "with this decay (e.g. 0.995, Unleashing's VQGAN): "
                                             "evaluation, quantizing and decoding use it. The "
                                             "codebook's own rate, which --ema_decay set before, "
                                             "is --codebook_decay")
    hflip: bool = field(False, "flip training images left-right at random (not for digits or "
                               "text)")
    val_fraction: float = field(0.1, "fraction of rows held out for validation")
    seed: int = field(0, "seed for the split, initialisation and batch order")
    eval_every: int = field(200, "evaluate and log reconstructions every N steps")
    checkpoint_every: int = field(500, "write checkpoints/last.pt every N steps")
    device: Optional[str] = field(None, "cpu, cuda or cuda:N (default: cuda when available)")
    dist_timeout: float = field(distributed.DEFAULT_TIMEOUT_S, distributed.TIMEOUT_HELP)
    precision: str = field("auto", PRECISION_HELP)
    experiment: Optional[str] = field(None, "MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME)")
    skip_bad_images: bool = field(False, "skip unreadable images with a warning instead of failing")
    num_workers: int = field(2, "DataLoader workers when images are streamed from disk")
    checkpoint_dir: str = field("checkpoints", "local copies of checkpoints, one folder per run")
    system_metrics: bool = field(False, "log the machine's CPU, memory, disk and network use "
                                        "(and GPU with nvidia-ml-py) to the run as system/..., "
                                        "every 10 s (MLflow's monitor; needs psutil)")
    adversarial_weight: float = field(0.0, "weight of a patch discriminator's loss, scaled by "
                                           "VQGAN's adaptive weight (0 = off)")
    adversarial_start: int = field(1000, "step at which the discriminator starts (it and its "
                                         "loss are off before)")
    discriminator_channels: int = field(64, "width of the patch discriminator's first layer")
    discriminator_layers: int = field(2, "stride-2 convs of the patch discriminator")


# Settings that may change when a run is resumed; everything else is the run's recorded value.
RESUME_OVERRIDES = ("max_steps", "epochs", "max_minutes", "device", "dist_timeout", "precision",
                    "eval_every", "checkpoint_every", "num_workers", "checkpoint_dir",
                    "skip_bad_images", "accumulate", "system_metrics")


class Adversary:
    """The discriminator's side of adversarial training: the patch discriminator, its optimizer
    (Adam with betas (0.5, 0.9), as VQGAN), its DDP wrapper and grad scaler."""

    def __init__(self, config, train, ctx, precision="fp32"):
        self.config, self.train, self.ctx = config, train, ctx
        with torch.random.fork_rng(devices=[]):
            # its own seed: the VQ-VAE's k-means start and restarts draw what they draw without it
            torch.manual_seed(train.seed + 1)
            self.discriminator = PatchDiscriminator(config).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=train.learning_rate,
                                          betas=(0.5, 0.9), fused=True)
        self.precision = precision  # resolved (pipeline/device.py), the VQ-VAE's
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(ctx.device,
                                                                             precision))
        self.ddp = distributed.wrap(ctx, self.discriminator)
        self.discriminator.requires_grad_(False)  # only its own step trains it

    def generator_term(self, loss, reconstruction, last_layer):
        """-> (adaptive weight x adversarial_weight x generator loss, logged values). Uses the
        plain module: the decoder's gradient flows through it, its own weights get none."""
        fake = self.discriminator(reconstruction * 2 - 1)
        gen_loss = generator_loss(fake)
        weight = adaptive_weight(loss, gen_loss, last_layer)
        return (self.train.adversarial_weight * weight * gen_loss,
                {"train/generator_loss": gen_loss, "train/adaptive_weight": weight})

    def step(self, images, reconstructions, lr):
        """One discriminator step on (real, reconstructed) micro-batches in [0, 1]."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.discriminator.requires_grad_(True)
        logs = {}
        for i, (real, fake) in enumerate(zip(images, reconstructions)):
            with distributed.no_sync(self.ctx, self.ddp, sync=i == len(images) - 1):
                with autocast(self.ctx.device, self.precision):
                    # one forward for both halves: DDP expects one forward per backward
                    logits = self.ddp(torch.cat([real, fake]) * 2 - 1)
                    logits_real, logits_fake = logits[:len(real)], logits[len(real):]
                    loss = discriminator_loss(logits_real, logits_fake)
                self.scaler.scale(loss / len(images)).backward()
            for key, value in (("train/discriminator_loss", loss),
                               ("train/logits_real", logits_real.mean()),
                               ("train/logits_fake", logits_fake.mean())):
                logs[key] = logs.get(key, 0) + value.detach().float() / len(images)
        apply_gradients(self.discriminator, self.optimizer, self.scaler, self.train.grad_clip)
        self.discriminator.requires_grad_(False)
        return logs

    def state_dict(self):
        return {"config": asdict(self.config), "model": self.discriminator.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.discriminator.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def train_step(model, ddp_model, optimizer, scaler, images, train, ctx, run_id, step, lr,
               adversary=None, precision="fp32"):
    """One optimizer step on this process's `images` (B, C, S, S) in [0, 1], taken as
    `train.accumulate` equal micro-batches whose gradients add up (DDP all-reduces them once,
    after the last). Returns {metric: scalar tensor} averaged over micro-batches and ranks;
    stops (UserError) before stepping if the loss is not finite. precision: resolved
    (pipeline/device.py); the loss is taken on fp32 reconstructions (vqvae/model.py)."""
    micro_batches = images.chunk(train.accumulate)
    adversarial = adversary is not None and step >= train.adversarial_start
    optimizer.zero_grad(set_to_none=True)
    logs, reconstructions = {}, []
    for i, x in enumerate(micro_batches):
        with distributed.no_sync(ctx, ddp_model, sync=i == len(micro_batches) - 1):
            with autocast(ctx.device, precision):
                recon, loss, _ = ddp_model(x)
                objective, values = loss, {"train/vq_loss": loss}  # MSE + commitment
                if adversarial:
                    term, values_adv = adversary.generator_term(loss, recon,
                                                                model.decoder.last_layer)
                    objective, values = objective + term, {**values, **values_adv}
            scaler.scale(objective / len(micro_batches)).backward()
        reconstructions.append(recon.detach())
        for key, value in {"objective": objective, **values}.items():
            logs[key] = logs.get(key, 0) + value.detach().float() / len(micro_batches)
    model.quantizer.apply_deferred_update()  # the micro-batches' EMA statistics, as one batch
    # one all-reduce for every logged value; every rank then stops on a NaN anywhere
    logs = dict(zip(logs, distributed.mean(ctx, torch.stack(list(logs.values())))))
    check_finite(logs.pop("objective"), run_id, step)
    apply_gradients(ddp_model, optimizer, scaler, train.grad_clip)
    if adversarial:
        adversary_logs = adversary.step(micro_batches, reconstructions, lr)
        averaged = distributed.mean(ctx, torch.stack(list(adversary_logs.values())))
        logs.update(zip(adversary_logs, averaged))
    return logs


@torch.no_grad()
def evaluate(model, data, indices, device, batch_size=256, precision="fp32"):
    """Reconstruction and codebook metrics over `indices` (pixels on the [0, 1] scale)."""
    model.eval()
    squared_error, pixels, loss_sum, batches = 0.0, 0, 0.0, 0
    counts = torch.zeros(model.config.codebook_size, device=device)
    for batch in data.ordered(indices, batch_size):
        images = batch.to(device).float() / 255
        with autocast(device, precision):
            recon, loss, codes = model(images)
        squared_error += (recon.float().clamp(0, 1) - images).pow(2).sum().item()
        pixels += images.numel()
        loss_sum, batches = loss_sum + loss.item(), batches + 1
        counts += torch.bincount(codes.flatten(), minlength=len(counts))
    model.train()
    mse = squared_error / pixels
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    return {"val/vq_loss": loss_sum / batches, "val/pixel_mse": mse,
            "val/psnr_db": 10 * math.log10(1 / max(mse, 1e-12)),
            "val/codebook_usage": (counts > 0).float().mean().item(),
            "val/codebook_perplexity": math.exp(entropy)}


def run_description(model, train, flags, csv_sha256, num_train, num_val):
    """The run's description: what it is, the command that reproduces it, data, metrics."""
    size, grid = model.image_size, model.grid_size
    kind = "grayscale" if model.in_channels == 1 else "RGB"
    return describe.description(
        f"VQ-VAE tokenizer: {size}x{size} {kind} images -> {grid}x{grid} grids of codes from "
        f"a codebook of {model.codebook_size}",
        command=describe.script_command("train_vqvae.py", flags),
        started_by=describe.process_command(),
        data=f"`{train.path_to_data}` (SHA-256 `{csv_sha256[:12]}...`): {num_train:,} images "
             f"for training, {num_val:,} held out for validation (val_fraction "
             f"{train.val_fraction}, seed {train.seed}); both under *Datasets*",
        metrics={**METRICS, **(ADVERSARIAL_METRICS if train.adversarial_weight else {})},
        artifacts={
            "reconstructions": "Model metrics tab: 8 validation images (left) and their "
                               "reconstructions (right) at each evaluation; step 0 is before "
                               "training. Files under images/",
            "config.json": "every setting, and the CSV's SHA-256",
            "checkpoints/last.pt, best.pt": "weights-only checkpoints (model config, weights, "
                                            "averaged weights when --ema_decay, optimizer, "
                                            "step)",
            "codes/<name>.npy, .json": "code grids (N, h, w), added by quantize_dataset.py or "
                                       "the pipeline"},
        notes=["`ceiling/*`, when present, is logged by the pipeline: the quality figures of "
               "best.pt's reconstructions of training images, what a perfect prior could reach.",
               "", "Resume: `python train_vqvae.py --resume_run_id <this run's ID>`"])


def random_hflip(images, generator):
    """(B, C, S, S) with each image mirrored left-right with probability 1/2, drawn from
    `generator` (a CPU torch.Generator)."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def flip_generator(seed, step, rank):
    """The flips' generator of one step: seeded by (seed, step, rank), so a resumed run flips
    what it would have flipped, and ranks flip their own images independently."""
    return torch.Generator().manual_seed(hash((seed, step, rank)))


def training_quantiles(data, train_idx, seed):
    """(C, KNOTS) pixel quantiles of the training split (a seeded subset of at most
    tone.MAX_IMAGES images: enough for 257 quantiles, one pass over a small part of a large CSV)."""
    pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
    chosen = sorted(int(train_idx[i]) for i in pick[:tone.MAX_IMAGES])
    return tone.pixel_quantiles(torch.cat(list(data.ordered(chosen, 512))).float() / 255)


@torch.no_grad()
def log_reconstructions(run, model, preview, step):
    """Queue the `reconstructions` image: the preview images and the model's reconstructions."""
    model.eval()
    recon = model(preview)[0]
    model.train()
    run.log_image(reconstruction_grid(preview, recon), "reconstructions", step)


def train_vqvae(model_flags=None, train_flags=None, resume_run_id=None, parent_run_id=None,
                tags=None, progress=True, source=None):
    """Train (or resume) a VQ-VAE; returns the MLflow run id (None on torchrun ranks > 0).

    model_flags / train_flags: the VQVAEConfig / TrainConfig fields the user set. Under torchrun
    every process calls this; see pipeline/distributed.py. source: the CSV already read
    (images.Source; the one command's), else --path_to_data is read."""
    train_flags = train_flags or {}
    with distributed.process_group(train_flags.get("device"),
                                   train_flags.get("dist_timeout")) as ctx:
        return _train(ctx, model_flags, train_flags, resume_run_id, parent_run_id, tags, progress,
                      source)


def _train(ctx, model_flags, train_flags, resume_run_id, parent_run_id, tags, progress,
           source=None):
    if resume_run_id:
        recorded = recorded_config(STAGE, resume_run_id, KIND)
        overrides = {k: v for k, v in train_flags.items() if k in RESUME_OVERRIDES}
        train = build(TrainConfig, recorded["train"], overrides)
        model_config = build(VQVAEConfig, recorded["model"])
    else:
        train = build(TrainConfig, train_flags)
        model_config = None
    if not train.path_to_data:
        raise UserError("--path_to_data is required (a CSV with an image_path column, or a "
                        "folder of images)")
    train_loop.settle_budget(train, train_flags, bool(resume_run_id))
    check_settings(train, ctx.world_size)
    if train.system_metrics:
        tracking.require_psutil()
    if train.accumulate < 1 or train.batch_size % (ctx.world_size * train.accumulate):
        raise UserError(f"--accumulate {train.accumulate} must be at least 1 and split each "
                        f"process's {train.batch_size // ctx.world_size} images of --batch_size "
                        f"{train.batch_size} into equal micro-batches")
    if train.adversarial_weight < 0 or train.adversarial_start < 0:
        raise UserError(f"--adversarial_weight and --adversarial_start must not be negative, got "
                        f"{train.adversarial_weight} and {train.adversarial_start}")
    source = source or read_source(train.path_to_data)
    table = source.table
    channels = train.in_channels or source.channels(train.skip_bad_images)
    if model_config is None:
        model_config = build(VQVAEConfig, model_flags, {"in_channels": channels})
        model_config.validate()
        if "ema_decay" in train_flags and ctx.is_main:  # an older command's flag, other meaning
            print(f"note: --ema_decay {train.ema_decay} averages the VQ-VAE's weights; the "
                  f"codebook's update rate (what --ema_decay set before) is --codebook_decay",
                  file=sys.stderr)
    data = source.images(model_config.in_channels, model_config.image_size,
                         train.skip_bad_images, train.num_workers)
    train_idx, val_idx = source.split(train.val_fraction, train.seed, data)
    if len(val_idx) == 0:
        print("warning: no validation split; evaluating on the training images", file=sys.stderr)
        val_idx = train_idx
    epoch_steps = train_loop.apply_epochs(train, len(train_idx))
    if train.adversarial_weight > 0 and train.adversarial_start >= train.max_steps:
        raise UserError(f"--adversarial_start {train.adversarial_start} is not before --max_steps "
                        f"{train.max_steps}: the adversarial loss would never start")

    device = ctx.device
    precision = resolve_precision(train.precision, device)  # the param records this
    torch.manual_seed(train.seed)  # the same initial weights on every rank
    # channels-last weights and batches: mkldnn's layout, a CPU training step 6% faster
    model = VQVAE(model_config).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate,
                                  weight_decay=train.weight_decay, fused=True)  # one kernel
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, precision))
    model.quantizer.defer_updates = train.accumulate > 1
    adversary = None
    if train.adversarial_weight > 0:
        discriminator_config = DiscriminatorConfig(model_config.in_channels,
                                                   train.discriminator_channels,
                                                   train.discriminator_layers)
        discriminator_config.validate(model_config.image_size)
        adversary = Adversary(discriminator_config, train, ctx, precision)
    generator = torch.Generator().manual_seed(train.seed)  # batch order, identical on all ranks
    # read before the run opens, so an unreadable image cannot leave a run stuck at RUNNING
    preview = next(data.ordered(val_idx[:8], 8)).to(device).float() / 255
    quantiles = training_quantiles(data, train_idx, train.seed)

    def start_run():
        config = {"model": asdict(model_config), "train": asdict(train),
                  "data": {"csv_sha256": source.sha256, "num_images": len(data),
                           "num_train": len(train_idx), "num_val": len(val_idx)}}
        params = {**asdict(train), **asdict(model_config), "num_images": len(data),
                  "world_size": ctx.world_size,
                  "precision": precision}  # resolved model values (and precision) win
        name = model.run_name()
        note = run_description(model_config, train, {**train_flags, **(model_flags or {})},
                               config["data"]["csv_sha256"], len(train_idx), len(val_idx))
        datasets = describe.csv_inputs(table.data_path, config["data"]["csv_sha256"],
                                       {"training": train_idx, "validation": val_idx},
                                       ["image_path"] + (["label"] if table.labels else []))
        return TrainingRun.start(
            STAGE, config, params, train.checkpoint_dir, train.experiment, run_name=name,
            tags={tracking.TOKENIZER_TAG: KIND, **(tags or {})}, parent_run_id=parent_run_id,
            description=note, datasets=datasets)

    state, checkpoint = train_loop.open_run(ctx, STAGE, KIND, train, model, optimizer, generator,
                                            resume_run_id, start_run)
    if checkpoint is not None and adversary is not None and "discriminator" in checkpoint:
        adversary.load_state_dict(checkpoint["discriminator"])  # runs.resume does not know it
    del checkpoint
    ddp_model = distributed.wrap(ctx, model)
    batches = data.batches(train_idx, train.batch_size, generator, ctx.rank, ctx.world_size)

    def take_step(step, lr):
        images = next(batches).to(device, non_blocking=True).float() / 255
        if train.hflip:
            images = random_hflip(images, flip_generator(train.seed, step, ctx.rank))
        images = images.contiguous(memory_format=torch.channels_last)
        logs = train_step(model, ddp_model, optimizer, scaler, images, train, ctx, state.run_id,
                          step, lr, adversary, precision)
        return logs, len(images) * ctx.world_size

    def validate(evaluated):
        metrics = evaluate(evaluated, data, val_idx, device, precision=precision)
        return metrics, metrics["val/vq_loss"]

    def summary(metrics):
        return (f"val/psnr_db {metrics['val/psnr_db']:.2f}, "
                f"val/codebook_usage {metrics['val/codebook_usage']:.3f}, "
                f"val/codebook_perplexity {metrics['val/codebook_perplexity']:.1f}")

    def adversary_started(step):  # the objective changed: best.pt is the best since then
        return adversary is not None and step - train.eval_every < train.adversarial_start <= step

    trainer = train_loop.Trainer(
        label="vqvae", unit="images", loss="train/vq_loss", loss_digits=4,
        step=take_step, evaluate=validate, summary=summary,
        checkpoint=lambda: {"kind": KIND, "config": asdict(model_config),
                            "pixel_quantiles": quantiles,  # what tone matching sends samples to
                            **({"discriminator": adversary.state_dict()} if adversary else {})},
        # the slider's step 0, before any training; then one image per evaluation
        begin=lambda run, model: log_reconstructions(run, model, preview, 0),
        after_evaluation=lambda run, model, step: log_reconstructions(run, model, preview, step),
        objective_changed=adversary_started, epoch_steps=epoch_steps)
    with tracking.system_metrics(state.run_id if ctx.is_main and train.system_metrics else None):
        return train_loop.loop(ctx, trainer, train, model, optimizer, generator, state, progress)
