"""The registry of prior families: `--prior NAME` -> the module holding its config and model.

A family module defines `Config` (a dataclass subclassing priors.base.PriorConfig), `Model`
(subclassing priors.base.Prior) and optionally `TRAIN_DEFAULTS`, training settings sized for a
laptop that the user's flags override. Adding a family is one line here.
"""

import importlib

FAMILIES = {
    "gpt": "transformer.gpt",
    "absorbing": "transformer.absorbing",
    "pixelcnn": "pixelcnn.pixelcnn",
    "gated_pixelcnn": "pixelcnn.gated_pixelcnn",
    "pixelcnnpp": "pixelcnn.pixelcnnpp",
    "pixelsnail": "pixelcnn.pixelsnail",
}


def family(name):
    """The module of family `name` (a UserError naming the known ones otherwise)."""
    from core.errors import UserError
    if name not in FAMILIES:
        raise UserError(f"--prior must be one of {', '.join(FAMILIES)}, got '{name}'")
    return importlib.import_module(FAMILIES[name])


def build(name, config_dict):
    """A fresh model of family `name` from a config dict (unknown keys are ignored, missing
    ones take their defaults, so checkpoints from older versions still load)."""
    from core.config import build as build_config
    module = family(name)
    model = module.Model(build_config(module.Config, config_dict))
    return model


def from_checkpoint(checkpoint, averaged=True):
    """Rebuild a prior from a checkpoint dict alone, with its averaged (EMA) weights when it
    has them and `averaged`; in eval mode."""
    name = checkpoint.get("family", "gpt")  # checkpoints before the registry were all GPTs
    model = build(name, checkpoint["config"])
    weights = checkpoint.get("ema") if averaged and checkpoint.get("ema") else checkpoint["model"]
    model.load_state_dict(weights)
    return model.eval()
