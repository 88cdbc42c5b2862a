"""`python -m pipeline --minutes N`: one deadline, spread over the stages.

The stages that train get time budgets (their --max_minutes), and their learning-rate schedules
follow whichever of the time and the steps is further spent (pipeline/train_loop.py), so a run cut
short by the clock still ends on a fully decayed rate. The preset's --max_steps stay the cap: a
machine fast enough for them finishes early, and a slow one, or larger images, end on time.

Shares of the budget, from stage times measured on 2 CPU cores: the demo digits (16 px grey)
spent 58 s on the VQ-VAE, 94 s on the prior and 15 s on everything else (ceiling, quantizing,
sampling, quality); 800 RGB crops at 32 px spent 7.3 minutes on the VQ-VAE and 9.5 on the prior.
Held back from training: a share before the prior (the tokenizer's ceiling, quantizing) and one
after it (sampling, the tone calibration draw, the quality draws). A tokenizer that is fitted,
not trained, or a stage that is reused, leaves its time to the prior, which gets what is left
when it starts. Sampling and the tone calibration draw then get half the time left, the draw cut
to what fits at the speed sampling just had (its 4,096 grids of 8x8 codes once took 8 minutes on
a loaded machine), and the quality draws the rest (at least the saved samples are judged).
"""

import time

from core.errors import UserError

TOKENIZER_SHARE = 0.4     # of the training time, for a tokenizer trained by steps
BEFORE_PRIOR_SHARE = 0.1   # of the budget: the tokenizer's ceiling and quantizing
AFTER_PRIOR_SHARE = 0.2    # of the budget: sampling, tone calibration, the quality draws
GENERATE_SHARE = 0.5       # of the time left after the prior: sampling and tone calibration
MIN_STAGE_MINUTES = 0.1    # a stage started past its share still trains this long


class TimeBudget:
    """A deadline `minutes` from now, and the share of it each stage may spend."""

    def __init__(self, minutes, clock=time.perf_counter):
        if minutes <= 0:
            raise UserError(f"--minutes must be positive, got {minutes}")
        self.minutes, self.clock = minutes, clock
        self.end = clock() + 60 * minutes

    def left(self):
        """Minutes until the deadline (negative past it)."""
        return (self.end - self.clock()) / 60

    def tokenizer_minutes(self):
        training = self.minutes * (1 - BEFORE_PRIOR_SHARE - AFTER_PRIOR_SHARE)
        return max(MIN_STAGE_MINUTES, TOKENIZER_SHARE * training)

    def prior_minutes(self):
        """What is left once the time after the prior is held back (so it takes whatever the
        stages before it did not spend)."""
        return max(MIN_STAGE_MINUTES, self.left() - AFTER_PRIOR_SHARE * self.minutes)

    def generate_seconds(self):
        """What sampling and the tone calibration draw may take together (generate's
        time_limit_s): a share of the time left, the rest going to the quality draws."""
        return max(0.0, GENERATE_SHARE * self.left() * 60)

    def draws_that_fit(self, wanted, seconds_per_draw):
        """How many quality draws (the saved samples and up to wanted - 1 more, each about
        `seconds_per_draw`) end before the deadline; at least 1."""
        more = int(max(0.0, self.left() * 60) // max(seconds_per_draw, 1e-6))
        return max(1, min(wanted, 1 + more))

    def key(self):
        """The part of a stage's key the budget gives: the stages' own --max_minutes are computed
        from the clock and stay out of their keys, so the same command reuses its runs."""
        return {"minutes": self.minutes}
