"""The registry of prior families: `--prior NAME` -> the module holding its config and model.

A family module defines `Config` (a dataclass subclassing priors.base.PriorConfig), `Model`
(subclassing priors.base.Prior) and optionally `TRAIN_DEFAULTS`, training settings sized for a
laptop that the user's flags override, and `Sampling`, the dataclass of its sampling settings
where it takes more than priors.settings.SamplingConfig (which it subclasses). Adding a family
is one line here.
"""

import dataclasses

from core import registry
from core.config import build as build_config, from_record
from core.errors import UserError
from priors.settings import SamplingConfig

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
    return registry.load(FAMILIES, name, "--prior")


def sampling_class(name):
    """The dataclass of family `name`'s sampling settings: its module's `Sampling`, else the
    settings every prior takes (priors.settings.SamplingConfig)."""
    return getattr(family(name), "Sampling", SamplingConfig)


def all_sampling():
    """One dataclass with the sampling fields of every registered family (the first family's
    field where several declare a name): the flags of a script that learns the family only when
    it loads the run. A field not every family takes says which ones do in its help; the family
    refuses the others (sampling_settings)."""
    takers, first = {}, {}
    for name in FAMILIES:
        for f in dataclasses.fields(sampling_class(name)):
            takers.setdefault(f.name, []).append(name)
            first.setdefault(f.name, f)
    fields = []
    for f in first.values():
        help_text = f.metadata.get("help", "")
        if len(takers[f.name]) < len(FAMILIES):
            help_text += f" [{', '.join(takers[f.name])} prior only]"
        fields.append((f.name, f.type, dataclasses.field(default=f.default,
                                                         metadata={"help": help_text})))
    return dataclasses.make_dataclass("AllSampling", fields)


def sampling_settings(name, settings, where="--{}", kind=None):
    """Family `name`'s sampling dataclass (`kind`, default sampling_class(name)) from a dict of
    settings (None: not given, the field's default), validated. An option the family does not
    take is a UserError that names the families taking it; `where` formats a setting's name
    ("--{}", "request 3: {}")."""
    kind = kind or sampling_class(name)
    names = {f.name for f in dataclasses.fields(kind)}
    given = {k: v for k, v in settings.items() if v is not None}
    unknown = [k for k in given if k not in names]
    if unknown:
        others = [other for other in FAMILIES if other != name and unknown[0] in
                  {f.name for f in dataclasses.fields(sampling_class(other))}]
        raise UserError(f"the {name} prior does not take "
                        f"{', '.join(where.format(k) for k in unknown)}"
                        + (f"; {where.format(unknown[0])} is for the {', '.join(others)} prior"
                           if others else ""))
    config = kind(**given)
    config.validate(where)
    return config


def build(name, config_dict, recorded=False):
    """A fresh model of family `name` from a config dict (unknown keys are ignored, missing
    ones take their defaults). recorded: the dict is a checkpoint's, perhaps from an older
    version: a field it lacks takes the value it had then (core.config.from_record)."""
    module = family(name)
    make = from_record if recorded else build_config
    return module.Model(make(module.Config, config_dict))


def from_checkpoint(checkpoint, averaged=True):
    """Rebuild a prior from a checkpoint dict alone, with its averaged (EMA) weights when it
    has them and `averaged`; in eval mode."""
    name = checkpoint.get("family", "gpt")  # checkpoints before the registry were all GPTs
    model = build(name, checkpoint["config"], recorded=True)
    weights = checkpoint.get("ema") if averaged and checkpoint.get("ema") else checkpoint["model"]
    model.load_state_dict(weights)
    return model.eval()
