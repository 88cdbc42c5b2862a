"""A registry: names mapped to the modules that define them (prior families, tokenizer kinds).
Modules are imported when first asked for, so listing a family costs nothing until it is used."""

import importlib

from core.errors import UserError


def load(registry, name, flag):
    """The module registered as `name` in {name: module path}; a one-line UserError naming the
    known names (as `flag` takes them) otherwise."""
    if name not in registry:
        raise UserError(f"{flag} must be one of {', '.join(registry)}, got '{name}'")
    return importlib.import_module(registry[name])
