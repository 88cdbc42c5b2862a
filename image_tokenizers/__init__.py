"""The registry of tokenizer kinds: `--tokenizer NAME` -> the module holding its config and model.

A kind module defines `Config` (a dataclass with `image_size`, `in_channels` and a `validate()`)
and `Model` (subclassing image_tokenizers.base.Tokenizer). Adding a kind is one line here.
"""

from core import registry
from core.config import build as build_config

KINDS = {
    "vqvae": "vqvae.model",
    "pixels": "pixels.tokenizer",
}


def kind(name):
    """The module of tokenizer kind `name` (a UserError naming the known ones otherwise)."""
    return registry.load(KINDS, name, "--tokenizer")


def build(name, config_dict):
    """A fresh tokenizer of kind `name` from a config dict (unknown keys ignored, missing ones
    take their defaults, so checkpoints from older versions still load)."""
    module = kind(name)
    return module.Model(build_config(module.Config, config_dict))


def from_checkpoint(checkpoint, averaged=True):
    """Rebuild a tokenizer from a checkpoint dict alone ({"kind", "config", "model", ...}), with
    its averaged weights (the `ema` entry of a run trained with --ema_decay) when it has them and
    `averaged`; in eval mode."""
    model = build(checkpoint["kind"], checkpoint["config"])
    weights = checkpoint.get("ema") if averaged and checkpoint.get("ema") else checkpoint["model"]
    model.load_state_dict(weights)
    return model.eval()
