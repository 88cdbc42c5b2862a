"""How every script ends: `run_cli(main)` reports a user error, or a tracking store that is
down or refuses, as one `error: ...` line with exit status 2 (core/errors.py)."""

from core import errors
from pipeline.tracking import store_failure


def run_cli(main, argv=None):
    errors.run_cli(main, argv, explain=store_failure)
