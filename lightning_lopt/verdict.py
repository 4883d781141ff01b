"""Whether a training run stalled or diverged: one definition for meta-validation, checkpoint
selection and the benchmark."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["validation_verdict"]


def validation_verdict(final: float, early: float, adam_final: float) -> Optional[str]:
    """``"diverged"``, ``"stalled"`` or None for one run (a validation task, a benchmark seed).

    A run stalls when its final loss is above half its loss at 10% of the horizon while still more
    than twice what Adam at 1e-3 reaches: it stopped learning where there was much left to learn.

    Args:
        final: The run's final loss (meta-validation: the mean over its last 10%).
        early: Its loss at 10% of the horizon.
        adam_final: Adam 1e-3's final loss on the same task.
    """
    if not math.isfinite(final):
        return "diverged"
    if final > 0.5 * early and final > 2.0 * adam_final:
        return "stalled"
    return None
