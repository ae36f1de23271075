"""Stop signals that arrive before the training loop is ready.

Slurm's `--signal=B:USR1@N` can arrive up to a minute early, possibly while the job is
still importing torch or growing the model. The default action of SIGUSR1 would kill the
process without a checkpoint; instead it is remembered here and `SignalFlag` picks it up,
so the stage checkpoints at its first step boundary."""
from __future__ import annotations

import os
import signal

_pending: list[int] = []


def _remember(signum, frame) -> None:
    _pending.append(signum)


def install_early_handlers() -> None:
    signal.signal(signal.SIGUSR1, _remember)
    if os.environ.get("SLURM_JOB_ID"):  # under Slurm a TERM means preemption or the limit
        signal.signal(signal.SIGTERM, _remember)


def take_pending() -> int | None:
    """The first stop signal received before the loop started, if any (and forget them)."""
    first = _pending[0] if _pending else None
    _pending.clear()
    return first
