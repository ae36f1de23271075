"""One map from error kind to exit status and one-line message, for every `grow` command,
every torchrun rank and every Slurm job.

  2   bad input: config error (a key, a value, a data source, a config file)
  3   the growth check failed (a function-preserving growth changed the loss)
  4   `grow plan`: the plan is over a budget cap
  5   `grow predict`: the fit is not a law (a parameter at its bound, or an interval too wide)
  1   a checkpoint cannot be used, the disk is full (what was written is intact), or the
      training loss became NaN/infinite (nothing is saved past the last good checkpoint)
  128+N  stopped by signal N after a checkpoint (Slurm requeues on it)

Error classes are named, not imported, so this module imports nothing of the project and
anything may use it: a class whose module was never loaded cannot have been raised. Each
name is checked to exist by tests/cli/test_entry.py.
"""
from __future__ import annotations

import errno
import sys

EXIT_CONFIG = 2
EXIT_GROWTH_CHECK = 3
EXIT_OVER_BUDGET = 4
EXIT_NOT_A_LAW = 5
EXIT_FAILED = 1

# "module.Class" -> (exit status, prefix of the one-line message)
ERROR_KINDS: dict[str, tuple[int, str]] = {
    "orchestrator.config.errors.ConfigError": (EXIT_CONFIG, "config error: "),
    "orchestrator.data.errors.DataError": (EXIT_CONFIG, "config error: "),
    "orchestrator.run.transition.GrowthCheckError": (EXIT_GROWTH_CHECK, ""),
    "orchestrator.checkpoint.canonical.CheckpointError": (EXIT_FAILED, "checkpoint error: "),
    "orchestrator.run.stage_loop.TrainingDiverged": (EXIT_FAILED, "training diverged: "),
}
STOP_REQUESTED = "orchestrator.run.stage_loop.StopRequested"  # carries .signum
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UsageError(ValueError):
    """A command's own `key=value` options are wrong (grow search, predict, expand, ...):
    the command reports it in one line with status 2. Defined here, at the bottom, so the
    packages that read those options need not import the command layer."""


def fail(status: int, message: str) -> int:
    """Print `grow: <message>` on stderr and return `status`."""
    print(f"grow: {message}", file=sys.stderr, flush=True)
    return status


def _kind(error: BaseException) -> str | None:
    for cls in type(error).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in ERROR_KINDS or name == STOP_REQUESTED:
            return name
    return None


def exit_status(error: BaseException) -> int | None:
    """The exit status for a known kind of error, after printing its one line; None for
    anything else (a bug: let its traceback show)."""
    kind = _kind(error)
    if kind == STOP_REQUESTED:
        return 128 + error.signum  # the checkpoint is written; the signal said why we stop
    if kind is not None:
        status, prefix = ERROR_KINDS[kind]
        return fail(status, f"{prefix}{error}")
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return fail(EXIT_FAILED, f"disk full: {error.strerror} writing {error.filename or 'a file'}; "
                                 "checkpoints already written are intact - free space and run again")
    return None
