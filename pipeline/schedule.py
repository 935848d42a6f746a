"""Learning-rate schedule as a pure function of the optimizer step (nothing to save or restore).

Linear warm-up to the peak over the first `warmup` updates, then linear decay towards 0 at
`total`: the shape of `transformers.get_linear_schedule_with_warmup`, which the DistilBERT
reference uses with warmup_prop 0.05 (`warmup_steps = ceil(total * warmup_prop)`), shifted by one
update so that neither the first update nor the last has a learning rate of 0.
"""

from __future__ import annotations

import math


def warmup_steps(total: int, warmup_prop: float) -> int:
    """Steps of warm-up for a share of the run, rounded up as the reference does."""
    return math.ceil(total * warmup_prop)


def lr_at(step: int, peak: float, total: int, warmup: int) -> float:
    """Learning rate of the update numbered `step` (0-based, of `total`).

    >>> [round(lr_at(s, 1.0, 10, 2), 3) for s in range(10)]
    [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))
