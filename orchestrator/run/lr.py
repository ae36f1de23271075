"""Per-stage learning-rate schedule: linear warmup (the re-warm after a growth), then
decay to a floor over the rest of the stage.

`wsd` (warmup-stable-decay) spans the stages instead: every stage holds its peak after
the warmup, and only the schedule's last stage decays, linearly to the floor, over its
final `decay_steps` (see `orchestrator.schedule.wsd_decay_steps`: a fraction of the whole
schedule's tokens). The LR is a pure function of the step, so a resume continues it exactly.
"""
from __future__ import annotations

import math


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float, decay: str,
          decay_steps: int = 0) -> float:
    """Learning rate of the `step`-th (0-based) update of a stage of `steps` updates.
    `decay_steps`: wsd only, the stage's final updates that decay (0: the stage is stable)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant":
        return peak
    if decay == "wsd":
        done = step - (steps - decay_steps) + 1  # decay updates taken, this one included
        if done <= 0:
            return peak
        return peak + (floor - peak) * min(1.0, done / decay_steps)
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    if decay == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
