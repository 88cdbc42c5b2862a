"""Training the GPT prior on VQ code grids, tracked in MLflow. A plain loop.

Codes come from a VQ-VAE run's `codes/<name>.npy` (with its `codes/<name>.json` metadata), or
from a local .npy file with `--codebook_size`.
"""

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm import tqdm

from pipeline import distributed, tracking
from pipeline.codes import load_codes_file, load_run_codes
from pipeline.config import build, field
from pipeline.device import autocast, needs_grad_scaler
from pipeline.errors import UserError
from pipeline.images import split_indices
from pipeline.runs import TrainingRun, recorded_config, resume
from pipeline.schedule import learning_rate_at
from pipeline.training import check_finite, check_settings, optimizer_step
from transformer.model import GPT, GPTConfig

STAGE = "transformer"


@dataclass
class TrainConfig:
    run_id: Optional[str] = field(None, "VQ-VAE run whose codes/<codes>.npy to train on")
    codes: Optional[str] = field(None, "name of the codes artifact (default: the only/first one)")
    path_to_data: Optional[str] = field(None, "a local codes .npy (N, h, w) instead of a run")
    codebook_size: Optional[int] = field(None, "vocabulary size K, required with --path_to_data")
    batch_size: int = field(64, "sequences per step")
    max_steps: int = field(5000, "optimizer steps")
    learning_rate: float = field(6e-4, "peak AdamW learning rate (warmup, then cosine)")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (not on norms/biases)")
    grad_clip: float = field(1.0, "clip the gradient norm to this")
    val_fraction: float = field(0.1, "fraction of rows held out (same rows as the VQ-VAE's split)")
    seed: int = field(0, "seed for the split, initialisation and batch order")
    eval_every: int = field(250, "evaluate every N steps")
    checkpoint_every: int = field(500, "write checkpoints/last.pt every N steps")
    device: Optional[str] = field(None, "cpu, cuda or cuda:N (default: cuda when available)")
    experiment: Optional[str] = field(None, "MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME)")
    checkpoint_dir: str = field("checkpoints", "local copies of checkpoints, one folder per run")


RESUME_OVERRIDES = ("max_steps", "device", "eval_every", "checkpoint_every", "checkpoint_dir")


@torch.no_grad()
def evaluate(model, codes, device, batch_size=256):
    """Mean NLL in nats per code over `codes` (N, T)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(codes), batch_size):
        batch = codes[start:start + batch_size].to(device)
        with autocast(device):
            _, loss = model(batch)
        total, count = total + loss.item() * len(batch), count + len(batch)
    model.train()
    return total / count


def _load_codes(train):
    """-> (codes LongTensor (N, h, w), metadata dict with at least codebook_size)."""
    if train.run_id and train.path_to_data:
        raise UserError("give either --run_id (a VQ-VAE run) or --path_to_data (a .npy), not both")
    if train.run_id:
        return load_run_codes(train.run_id, train.codes)
    if train.path_to_data:
        if train.codebook_size is None:
            raise UserError("--path_to_data needs --codebook_size (the VQ-VAE's K)")
        codes = load_codes_file(train.path_to_data, train.codebook_size)
        return codes, {"codebook_size": train.codebook_size}
    raise UserError("give --run_id <VQ-VAE run> or --path_to_data codes.npy --codebook_size K")


def train_prior(model_flags=None, train_flags=None, resume_run_id=None, parent_run_id=None,
                tags=None, progress=True):
    """Train (or resume) the prior; returns the MLflow run id (None on torchrun ranks > 0).
    Under torchrun every process calls this; see pipeline/distributed.py."""
    train_flags = train_flags or {}
    with distributed.process_group(train_flags.get("device")) as ctx:
        return _train(ctx, model_flags, train_flags, resume_run_id, parent_run_id, tags, progress)


def _train(ctx, model_flags, train_flags, resume_run_id, parent_run_id, tags, progress):
    if resume_run_id:
        recorded = recorded_config(STAGE, resume_run_id)
        overrides = {k: v for k, v in train_flags.items() if k in RESUME_OVERRIDES}
        train = build(TrainConfig, recorded["train"], overrides)
    else:
        train = build(TrainConfig, train_flags)
    check_settings(train, ctx.world_size)

    grids, meta = _load_codes(train)
    n, grid_h, grid_w = grids.shape
    codes = grids.view(n, grid_h * grid_w)
    train_idx, val_idx = split_indices(n, train.val_fraction, train.seed)
    if len(val_idx) == 0:
        print("warning: no validation split; evaluating on the training codes", file=sys.stderr)
        val_idx = train_idx
    train_codes, val_codes = codes[torch.as_tensor(train_idx)], codes[torch.as_tensor(val_idx)]
    model_config = (build(GPTConfig, recorded["model"]) if resume_run_id else
                    build(GPTConfig, model_flags, {"vocab_size": meta["codebook_size"],
                                                   "grid_h": grid_h, "grid_w": grid_w}))
    # image dimensions per code, for bits/dim (known when the codes came from a VQ-VAE run)
    image_dims = (meta["in_channels"] * meta["image_size"] ** 2
                  if "image_size" in meta and "in_channels" in meta else None)

    device = ctx.device
    torch.manual_seed(train.seed)  # the same initial weights on every rank
    model = GPT(model_config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.learning_rate, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device))
    generator = torch.Generator().manual_seed(train.seed)  # batch order, identical on all ranks
    step, best_val_loss = 0, float("inf")
    lineage = {k: meta[k] for k in ("vqvae_run_id", "codes_name", "codebook_size", "grid",
                                    "image_size", "in_channels") if k in meta}

    if resume_run_id:
        run, step, best_val_loss = resume(ctx, STAGE, resume_run_id, train.checkpoint_dir,
                                          model, optimizer, generator)
    else:
        run_tags = dict(tags or {})
        if "vqvae_run_id" in meta:
            run_tags[tracking.VQVAE_RUN_TAG] = meta["vqvae_run_id"]
        config = {"model": asdict(model_config), "train": asdict(train), "vqvae": lineage}
        params = {**asdict(train), **asdict(model_config), "num_sequences": n,
                  "world_size": ctx.world_size}
        run = distributed.on_main(ctx, lambda: TrainingRun.start(
            STAGE, config, params, train.checkpoint_dir, train.experiment, tags=run_tags,
            parent_run_id=parent_run_id))
    run_id = distributed.broadcast_str(ctx, run.run_id if ctx.is_main else None)
    ddp_model = distributed.wrap(ctx, model)
    if ctx.enabled:
        torch.manual_seed(train.seed + ctx.rank)  # different dropout masks on different ranks

    def checkpoint_dict():
        return {"kind": "transformer", "config": asdict(model_config),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_val_loss": best_val_loss, "train": asdict(train),
                "rng": generator.get_state(), "run_id": run_id, "vqvae": lineage}

    bar = tqdm(total=train.max_steps, initial=step, desc="prior", unit="step",
               disable=not (progress and ctx.is_main), file=sys.stderr, dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    status = "FAILED"
    try:
        model.train()
        while step < train.max_steps:
            lr = learning_rate_at(step, train.learning_rate, train.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # every rank draws the same global batch and trains on its slice of it
            pick = torch.randint(len(train_codes), (train.batch_size,), generator=generator)
            batch = train_codes[distributed.shard(ctx, pick)].to(device, non_blocking=True)
            with autocast(device):
                _, loss = ddp_model(batch)
            mean_loss = distributed.mean(ctx, loss)  # every rank stops on a NaN anywhere
            check_finite(mean_loss, run_id, step)
            optimizer_step(loss, ddp_model, optimizer, scaler, train.grad_clip)
            step += 1
            window_tokens += batch.numel() * ctx.world_size
            bar.update(1)
            if not ctx.is_main:  # the rest (logging, evaluation, checkpoints) is rank 0's
                continue

            if step % 10 == 0 or step == train.max_steps:
                speed = window_tokens / (time.perf_counter() - window_start)
                window_start, window_tokens = time.perf_counter(), 0
                run.log_metrics({"train/loss": mean_loss.item(), "train/lr": lr,
                                 "train/tokens_per_sec": speed}, step)
                bar.set_postfix(loss=f"{mean_loss.item():.3f}", tok_s=f"{speed:.0f}")
            if step % train.eval_every == 0 or step == train.max_steps:
                val_loss = evaluate(model, val_codes, device)
                metrics = {"val/loss": val_loss}
                if image_dims:
                    metrics["val/bits_per_dim"] = val_loss * codes.shape[1] / (image_dims * math.log(2))
                run.log_metrics(metrics, step)
                bar.write(f"step {step}: val/loss {val_loss:.4f} nats/code")
                if val_loss < best_val_loss:
                    best_val_loss = val_loss
                    run.save("best.pt", checkpoint_dict())
                window_start = time.perf_counter()
            if step % train.checkpoint_every == 0 or step == train.max_steps:
                run.save("last.pt", checkpoint_dict())
        status = "FINISHED"
    finally:
        bar.close()
        if ctx.is_main:
            run.finish(status)
    return run_id if ctx.is_main else None
