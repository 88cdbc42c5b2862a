"""The pieces of one optimizer step shared by both trainers."""

import torch

from pipeline.errors import UserError


def check_finite(loss, run_id, step):
    """Stop with a message at a NaN/inf loss; checkpoints/last.pt still holds the last good state."""
    if not torch.isfinite(loss):
        raise UserError(f"run {run_id}: loss became {loss.item()} at step {step}; stopped. "
                        f"The last good checkpoint is checkpoints/last.pt "
                        f"(try a lower --learning_rate)")


def optimizer_step(loss, model, optimizer, scaler, grad_clip):
    """Backward, unscale (fp16), clip the gradient norm, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
