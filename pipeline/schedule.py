"""The learning-rate schedule of the training loop (pipeline/train_loop.py): linear warmup, then
cosine decay."""

import math


def warmup_steps_for(max_steps):
    """5% of training, at most 200 steps: enough to settle Adam's moment estimates."""
    return max(1, min(200, max_steps // 20))


def learning_rate_at(step, max_lr, max_steps, min_ratio=0.1):
    warmup = warmup_steps_for(max_steps)
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
