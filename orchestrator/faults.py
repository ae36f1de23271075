"""Failpoints: named places where a test can make the process die as if killed.

`GROW_FAILPOINTS="checkpoint.done@3,growth.done"` SIGKILLs the process the 3rd time
`failpoint("checkpoint.done")` runs, or the 1st time for `growth.done`; a `=raise` suffix
(`step.done@5=raise`) raises an exception there instead, as a crash would, and a `=sleep:S`
suffix (`step.done=sleep:0.5`) sleeps S seconds at every hit from the nth on, as a slow
node would, so a test of time limits does not depend on how fast the machine is. Unset
(always, outside the fault-tolerance tests) it costs one dict lookup.
"""
from __future__ import annotations

import os
import signal
import time

_armed: dict[str, tuple[int, str]] | None = None
_hits: dict[str, int] = {}


class InjectedFault(RuntimeError):
    pass


def _parse() -> dict[str, tuple[int, str]]:
    armed = {}
    for item in filter(None, os.environ.get("GROW_FAILPOINTS", "").split(",")):
        item, _, action = item.partition("=")
        name, _, nth = item.partition("@")
        if action not in ("", "raise") and not action.startswith("sleep:"):
            raise ValueError(f"GROW_FAILPOINTS: unknown action {action!r} in {item!r}; "
                             "allowed: (none), raise, sleep:SECONDS")
        armed[name.strip()] = (int(nth or 1), action)
    return armed


def failpoint(name: str) -> None:
    global _armed
    if _armed is None:
        _armed = _parse()
    if name not in _armed:
        return
    _hits[name] = _hits.get(name, 0) + 1
    nth, action = _armed[name]
    if action.startswith("sleep:"):
        if _hits[name] >= nth:
            time.sleep(float(action[len("sleep:"):]))
    elif _hits[name] == nth:
        if action == "raise":
            raise InjectedFault(f"failpoint {name} (hit {nth})")
        os.kill(os.getpid(), signal.SIGKILL)


# The places the runner passes through, in order; the kill harness aims at each.
FAILPOINTS = (
    "checkpoint.tmp_written",  # checkpoint files in the temp dir, not yet renamed
    "checkpoint.renamed",  # renamed into place, `latest` not yet updated
    "checkpoint.done",  # `latest` updated
    "growth.done",  # grown in memory, step-0 checkpoint of the new stage not written
    "stage.complete",  # stage-final checkpoint written, next stage not started
    "step.done",  # after an optimizer step, before its bookkeeping
)
# Not on every run's path (so not in FAILPOINTS, which the kill harness aims at on tiny):
# "positions.switched": a stage's RoPE scaling switched in memory, its step-0 checkpoint not written.
