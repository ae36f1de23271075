"""`grow run [overrides]`: run a growth schedule under Hydra.

The config is composed and validated before Hydra starts the job, so a bad key, value or
config file exits with status 2 and one line, before anything is read, built or written;
the Hydra task then runs that validated config (orchestrator/commands/run_job.py).
"""
from __future__ import annotations

import os
import sys

from orchestrator.run.signals import install_early_handlers


def _no_world_writable_files() -> None:
    """Whatever umask we were started with, nothing we write is group/world-writable."""
    os.umask(os.umask(0o022) | 0o022)


def run_command(args: list[str]) -> int:
    _no_world_writable_files()
    install_early_handlers()  # a Slurm signal during startup becomes a checkpoint, not a kill
    # Imported only now, after the handlers: torch and Hydra take seconds to load, and a
    # Slurm stop signal arriving meanwhile would kill the job without a checkpoint.
    import hydra

    from orchestrator.commands.run_job import precheck, run_job
    from orchestrator.config.schema import register_schema
    from orchestrator.package_data import CONF_DIR

    validated = precheck(args)
    if isinstance(validated, int):
        return validated

    def run_validated(raw_cfg) -> None:
        run_job(raw_cfg, validated)

    task = run_job if validated is None else run_validated  # a sweep's members check their own
    register_schema()
    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(task)
    sys.argv = ["grow run", *args]
    main()
    return 0
