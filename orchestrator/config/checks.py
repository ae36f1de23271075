"""The check step of parse -> resolve -> check: a registry each domain fills with its own rules.

A check is a function of the resolved schedule (`schedule.cfg` is the typed config) that
raises ConfigError naming the key. Each package registers the checks of its own settings
in its own `checks.py` (data in orchestrator/data, layouts in orchestrator/engines, caps in
orchestrator/budget, ...), so this layer knows no domain. Checks run phase by phase, and
within a phase in the order their packages were loaded (orchestrator.commands.configure
fixes that order), so the first error reported is deterministic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from orchestrator.config.errors import ConfigError

# settings: one domain's own settings, relating several fields
# stages: each stage's shape, tokens, learning rate, layout and data mixture
# schedule: what spans stages (growth, decay windows, budget caps, a starting checkpoint)
# layouts: whether the engine runs each stage's layout (`grow run`, `grow submit`)
# files: what must be read to be trusted (the heads of the data files)
# machine: what only the machine the run starts on can tell (paths, device, memory)
PHASES = ("settings", "stages", "schedule", "layouts", "files", "machine")


@dataclass(frozen=True)
class Check:
    phase: str
    run: Callable[[Any], None]  # schedule -> None, or ConfigError

    @property
    def name(self) -> str:
        return f"{self.run.__module__}.{self.run.__qualname__}"


_REGISTRY: list[Check] = []


def check(phase: str):
    """Register the decorated function as a check of `phase`."""
    if phase not in PHASES:
        raise ValueError(f"unknown check phase {phase!r}; allowed: {', '.join(PHASES)}")

    def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        new = Check(phase, fn)
        for i, c in enumerate(_REGISTRY):
            if c.name == new.name:  # a module imported again replaces its checks in place
                _REGISTRY[i] = new
                return fn
        _REGISTRY.append(new)
        return fn
    return register


def registered(phases: tuple[str, ...] = PHASES) -> list[Check]:
    """The registered checks of `phases`, in the order they run."""
    return [c for phase in phases for c in _REGISTRY if c.phase == phase]


def run_checks(schedule: Any, phases: tuple[str, ...]) -> None:
    for c in registered(phases):
        c.run(schedule)


def check_creatable_dir(key: str, given: str) -> None:
    """`given` is a directory, or can be made one: its nearest existing ancestor is a
    writable directory (not a regular file). For the `machine` checks of any domain."""
    path = Path(given).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"is under a file ({probe})"
        raise ConfigError(key, f"{given} {where}, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK) and probe != path:
        raise ConfigError(key, f"{given} cannot be created: {probe} is not writable")
