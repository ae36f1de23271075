"""parse -> resolve -> check: how every command turns a composed config into the one
resolved `Schedule` it works from.

Parsing builds the typed config (each field's own constraints), resolving computes every
derived value once, and the checks each domain registered (in its own `checks.py`) run
against the result, phase by phase. This module sits above every domain, so it is where
their checks are loaded - in the order listed below, which is the order a phase runs them.
"""
from __future__ import annotations

from omegaconf import DictConfig

import orchestrator.schedule.checks  # noqa: F401  (stage names, shapes, rates, growth, wsd)
import orchestrator.data.checks  # noqa: F401  (tokenizer, sources, mixtures, files)
import orchestrator.checkpoint.checks  # noqa: F401  (init_from)
import orchestrator.budget.checks  # noqa: F401  (rates, loss fit, caps)
import orchestrator.tracking.checks  # noqa: F401  (store)
import orchestrator.engines.checks  # noqa: F401  (engine, layouts, device, memory)
import orchestrator.run.checks  # noqa: F401  (run directory)
from orchestrator.config.checks import run_checks
from orchestrator.config.parse import parse
from orchestrator.config.schema import RunConfig
from orchestrator.schedule import Schedule, resolve


def phases(planning: bool = False, runs_here: bool = False) -> tuple[str, ...]:
    """`planning` (grow plan): layouts are not the engine's to check (the plan checks them
    against the cluster); `runs_here` (grow run): also what this machine must provide
    (paths, device, memory)."""
    return ("settings", "stages", "schedule", *(() if planning else ("layouts",)), "files",
            *(("machine",) if runs_here else ()))


def check_config(cfg: RunConfig, planning: bool = False, runs_here: bool = False) -> Schedule:
    """A typed config, resolved once and checked: its schedule, or ConfigError."""
    schedule = resolve(cfg)
    run_checks(schedule, phases(planning, runs_here))
    return schedule


def configure(raw: DictConfig | dict, planning: bool = False, runs_here: bool = False) -> Schedule:
    """A composed Hydra config (or plain dict) -> its checked, resolved schedule."""
    return check_config(parse(raw), planning, runs_here)


def load_config(raw: DictConfig | dict, planning: bool = False, runs_here: bool = False) -> RunConfig:
    """The checked config alone (`configure(...).cfg`)."""
    return configure(raw, planning, runs_here).cfg
