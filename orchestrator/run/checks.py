"""The run directory, checked on the machine a run starts on (registered with
orchestrator.config.checks)."""
from __future__ import annotations

from orchestrator.config.checks import check, check_creatable_dir
from orchestrator.schedule import Schedule


@check("machine")
def run_dir(schedule: Schedule) -> None:
    check_creatable_dir("hydra.run.dir", schedule.cfg.run_dir)  # where `grow run` takes run_dir from
