"""The foundation every layer may import: user-facing errors and config dataclasses as flags.

It imports nothing else of this project (tests/test_layers.py checks it)."""
