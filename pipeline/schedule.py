"""The learning-rate schedule of the training loop (pipeline/train_loop.py): a linear warmup, then
one of three shapes (`--lr_schedule`), shaped by `--lr_decay`:

    cosine    half a cosine from the peak down to lr_decay × peak at the last step (default 0.1)
    constant  the peak until the end (lr_decay does not apply)
    step      × lr_decay at the end of every epoch (default 0.9), as PixelCNN++ decays its rate

`--epochs N` trains N passes over the training split instead of --max_steps (epochs_to_steps).
"""

import math

SCHEDULES = ("cosine", "constant", "step")
DEFAULT_DECAY = {"cosine": 0.1, "step": 0.9}


def warmup_steps_for(max_steps):
    """5% of training, at most 200 steps: enough to settle Adam's moment estimates."""
    return max(1, min(200, max_steps // 20))


def steps_per_epoch(train_items, batch_size):
    """Optimizer steps in one pass over `train_items` items (the last batch may be short)."""
    return max(1, math.ceil(train_items / batch_size))


def epochs_to_steps(epochs, train_items, batch_size):
    return max(1, math.ceil(epochs * steps_per_epoch(train_items, batch_size)))


def learning_rate_at(step, max_lr, max_steps, schedule="cosine", decay=None, epoch_steps=1):
    """The learning rate of optimizer step `step` (0-based) of `max_steps`; `epoch_steps` is
    steps_per_epoch, which only the step schedule reads."""
    warmup = warmup_steps_for(max_steps)
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if schedule == "constant":
        return max_lr
    decay = DEFAULT_DECAY[schedule] if decay is None else decay
    if schedule == "step":
        return max_lr * decay ** (step // epoch_steps)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return max_lr * (decay + (1 - decay) * 0.5 * (1 + math.cos(math.pi * progress)))
