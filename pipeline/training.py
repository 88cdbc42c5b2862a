"""What both trainers share: the settings check and the pieces of one optimizer step."""

import torch

from core.errors import UserError


def check_settings(train, world_size):
    """Step counts must be positive; the global batch must split evenly over the processes."""
    for name in ("batch_size", "max_steps", "eval_every", "checkpoint_every"):
        if getattr(train, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(train, name)}")
    if train.batch_size % world_size:
        raise UserError(f"--batch_size {train.batch_size} must be a multiple of the number of "
                        f"processes ({world_size}): it is the global batch")


def check_finite(loss, run_id, step):
    """Stop with a message at a NaN/inf loss; checkpoints/last.pt still holds the last good state."""
    if not torch.isfinite(loss):
        raise UserError(f"run {run_id}: loss became {loss.item()} at step {step}; stopped. "
                        f"The last good checkpoint is checkpoints/last.pt "
                        f"(try a lower --learning_rate)")


def apply_gradients(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip the gradient norm, step: the end of a step whose gradients were
    accumulated by one or more backward passes."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
