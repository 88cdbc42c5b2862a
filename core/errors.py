"""User-facing errors: one line on stderr, a non-zero exit, no traceback.

Library code raises `UserError` for anything the user can fix (a bad path, a wrong run id, a
mismatched artifact). Scripts wrap their entry point in `run_cli`, which turns those into a
one-line message; `explain` lets the application layer name other failures that are not bugs
(pipeline/cli.py passes the tracking store's). Anything else is a bug in this toolkit and keeps
its traceback. A training stopped by SIGTERM (what schedulers and `docker stop` send) raises
`Terminated`, which exits with 143 as a process killed by SIGTERM would; Ctrl-C exits with 130.
"""

import sys


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class Terminated(KeyboardInterrupt):
    """A stop asked for by a signal (SIGTERM, Ctrl-C), after a graceful end: the message says
    where it stopped. `signal` is its number: the exit status is 128 + signal."""

    def __init__(self, message, signal=15):
        super().__init__(message)
        self.signal = signal


def run_cli(main, argv=None, explain=None):
    """Call `main(argv)`; report `UserError` (and any exception `explain(e)` has a message for)
    as `error: ...` and exit with status 2."""
    try:
        main(argv)
    except UserError as e:
        _fail(str(e))
    except Exception as e:
        message = explain(e) if explain is not None else None
        if message is None:
            raise
        _fail(message)
    except Terminated as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(128 + e.signal)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def _fail(message):
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # a single line
    sys.exit(2)
