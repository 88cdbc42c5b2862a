"""Progress bars for the waits a user sits through: sampling, the tone calibration draw, quality
draws, quantizing, decoding, the last uploads of a training.

tqdm on stderr (stdout keeps `run_id=...` as its last line), with its rate and time left. A bar
shows only once its wait has lasted DELAY_S seconds, so quick calls (a test's, a served
request's) print nothing, and it is cleared when done: the lines the commands print after a wait
say what it took. A wait made of smaller ones (the batches of a draw, the seeds of the quality
draws) has one bar, which the inner loops advance.
"""

import sys

from tqdm import tqdm

DELAY_S = 2.0  # a wait shorter than this prints no bar
# tqdm's own format, with the count rounded: a draw advances by shares of a batch of grids
FORMAT = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def progress_bar(total, desc, unit, enabled=True):
    """A tqdm bar for `total` `unit`s (grids, images, uploads); disabled with enabled=False."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, delay=DELAY_S,
                file=sys.stderr, dynamic_ncols=True, leave=False, bar_format=FORMAT)
