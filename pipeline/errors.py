"""User-facing errors: one line on stderr, a non-zero exit, no traceback.

Library code raises `UserError` for anything the user can fix (a bad path, a wrong run id, a
mismatched artifact). Scripts wrap their entry point in `run_cli`, which turns those, and a
tracking store that cannot be reached, into a one-line message. Anything else is a bug in this
toolkit and keeps its traceback.
"""

import sys


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


def run_cli(main, argv=None):
    """Call `main(argv)`; report `UserError` as `error: ...` and exit with status 2."""
    try:
        main(argv)
    except UserError as e:
        message = " ".join(str(e).split())  # guarantee a single line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        from pipeline.tracking import store_failure
        message = store_failure(e)  # the tracking store is down or refused: not a bug here
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
