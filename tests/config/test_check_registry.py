"""The check step's registry: every domain registers its own checks, once, and they run
phase by phase in a fixed order."""
from __future__ import annotations

import importlib

import orchestrator.commands.configure  # noqa: F401  (loads every domain's checks)
from orchestrator.config.checks import PHASES, registered


def test_each_domain_registers_its_checks_once_and_phases_run_in_order():
    checks = registered()
    names = [c.name for c in checks]
    assert len(names) == len(set(names))
    assert {n.split(".")[1] for n in names} == {"schedule", "data", "checkpoint", "budget", "tracking",
                                                "engines", "run"}
    assert [c.phase for c in checks] == sorted((c.phase for c in checks), key=PHASES.index)
    assert names[0] == "orchestrator.schedule.checks.stage_names"  # unique names before anything else
    importlib.reload(importlib.import_module("orchestrator.data.checks"))  # imported again: no duplicates
    assert [c.name for c in registered()] == names
    assert [c.name for c in registered(("machine",))] == [n for n, c in zip(names, checks) if c.phase == "machine"]
