"""Per-stage learning-rate schedule: linear warmup (the re-warm after a growth), then
decay to a floor over the rest of the stage."""
from __future__ import annotations

import math


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float, decay: str) -> float:
    """Learning rate of the `step`-th (0-based) update of a stage of `steps` updates."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant":
        return peak
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    if decay == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
