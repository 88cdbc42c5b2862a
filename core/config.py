"""Command-line flags from config dataclasses, and knowing which flags the user actually gave.

Each flag is a dataclass field (`--batch_size` is `TrainConfig.batch_size`); its help text is
the field's `metadata["help"]`. Flags default to "not given", so resuming a run can tell the
settings the user changed from the ones recorded in the run.
"""

import argparse
import dataclasses
import typing


def field(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def field_type(f):
    """The type of a dataclass field, without Optional (int for Optional[int])."""
    hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_flags(parser, config_class, skip=(), prefix="", hidden=False):
    """One `--{prefix}name` flag per dataclass field, defaulting to argparse.SUPPRESS (= not
    given). The prefix (e.g. "prior.") lets one command take the flags of several stages;
    `hidden` leaves them out of --help (a second spelling of flags listed elsewhere)."""
    for f in dataclasses.fields(config_class):
        if f.name in skip or not f.init:
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = argparse.SUPPRESS if hidden else f"{help_text} (default: {default})"
        kind = field_type(f)
        if kind is bool:
            parser.add_argument(f"--{prefix}{f.name}", action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=shown)
        else:
            parser.add_argument(f"--{prefix}{f.name}", type=kind, default=argparse.SUPPRESS,
                                help=shown)


def given(namespace, config_class, prefix=""):
    """The flags of `config_class` (named `{prefix}field`) that appear in the namespace."""
    names = {prefix + f.name for f in dataclasses.fields(config_class)}
    return {k[len(prefix):]: v for k, v in vars(namespace).items() if k in names}


def build(config_class, *layers):
    """config_class(**defaults | layer1 | layer2 ...), ignoring keys it does not have. A class
    may list renamed fields as `renamed = {old: new}` (a ClassVar): a layer's old key, recorded
    before the rename, is read as the new one unless the layer has the new one too."""
    names = {f.name for f in dataclasses.fields(config_class)}
    renamed = getattr(config_class, "renamed", {})
    values = {}
    for layer in layers:
        layer = dict(layer or {})
        for old, new in renamed.items():
            if old in layer and new not in layer:
                layer[new] = layer.pop(old)
        values.update({k: v for k, v in layer.items() if k in names})
    return config_class(**values)


def from_record(config_class, recorded):
    """build() from a config recorded by an earlier version (a checkpoint's): a field the record
    lacks takes the value it had before the field existed, when the class lists it as
    `before = {field: value}` (a ClassVar), not today's default, so the model is the one that
    was trained."""
    before = getattr(config_class, "before", {})
    return build(config_class, {k: v for k, v in before.items() if k not in recorded}, recorded)
