"""The sampling settings: one description, from which every place that takes them derives.

`SamplingConfig` holds the settings every prior's sample() takes. A family with options of its
own declares a dataclass subclassing it in its model file and registers it as `Sampling` beside
`Config` and `Model` (transformer/absorbing.py: steps, sampler, ...); a family without extras
leaves it out. From these dataclasses (priors.sampling_class, priors.all_sampling) come the
flags of transformer_generation.py, the pipeline's --sample.<flag>, the served model's request
columns and what generated/<name>.json records; adding a field to a family's dataclass adds
the option everywhere.

`validate(where)` holds the checks that need nothing but the settings; the ones that need the
model (a number of steps against the grid's tokens, guidance against a conditional prior) stay
in the model's sample(). `where` formats a setting's name in the errors: "--{}" (a flag), or
"request 3: {}" for the served model.
"""

import math
from dataclasses import dataclass
from typing import Optional

from core.config import field
from core.errors import UserError
from priors.sampling import MAX_GUIDANCE


# Settings (of some families) that make images larger than the tokenizer's: the pipeline cannot
# judge such samples against held-out images, and a served model would let one request ask for
# any size, so neither takes them (transformer_generation.py does).
LARGER_IMAGES = ("grid_h", "grid_w")


@dataclass
class SamplingConfig:
    temperature: float = field(1.0, "divides the log-probabilities of every drawn token (0 = "
                                    "always the likeliest; < 1 sharper, > 1 flatter)")
    top_k: Optional[int] = field(None, "sample among the k likeliest values")
    top_p: Optional[float] = field(None, "nucleus sampling: among the likeliest values holding "
                                         "this much probability, in (0, 1]")
    guidance: Optional[float] = field(None, "conditional priors: classifier-free guidance "
                                            "weight w, log p = log p_uncond + w (log p_cond - "
                                            "log p_uncond); 1 = plain conditional, 0 = "
                                            "unconditional")

    def validate(self, where="--{}"):
        # ranges written as `lo <= x <= hi`, which NaN fails too (`x < 0` would let it through)
        if self.temperature is not None and not 0 <= self.temperature < math.inf:
            raise UserError(f"{where.format('temperature')} must be >= 0 (0 = always the "
                            f"likeliest), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"{where.format('top_k')} must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"{where.format('top_p')} must be in (0, 1], got {self.top_p}")
        if self.guidance is not None and not 0 <= self.guidance <= MAX_GUIDANCE:
            raise UserError(f"{where.format('guidance')} must be in 0..{MAX_GUIDANCE:g} (1 = "
                            f"plain conditional), got {self.guidance}")


def setting_name(where, key):
    """A setting's name as `where` formats it, without the request's place ('request 3: steps'
    -> 'steps', '--steps' stays): for a second setting named inside one message."""
    return where.format(key).rpartition(": ")[2]
