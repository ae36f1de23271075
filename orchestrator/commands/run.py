"""`grow run [overrides]`: run a growth schedule under Hydra.

The config is composed, resolved and checked before Hydra starts the job, so a bad key, value
or config file exits with status 2 and one line, before anything is read, built or written;
the Hydra task then runs that checked schedule (orchestrator/commands/run_job.py).
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

from orchestrator.config.errors import ConfigError
from orchestrator.exits import exit_status, fail
from orchestrator.run.lock import RunLock, first_rank
from orchestrator.run.signals import install_early_handlers
from orchestrator.secrets import overrides_without_secrets


def _no_world_writable_files() -> None:
    """Whatever umask we were started with, nothing we write is group/world-writable."""
    os.umask(os.umask(0o022) | 0o022)


def run_command(args: list[str]) -> int:
    _no_world_writable_files()
    install_early_handlers()  # a Slurm signal during startup becomes a checkpoint, not a kill
    if "-m" in args or "--multirun" in args:  # Hydra copies a sweep's overrides into files and logs
        args = overrides_without_secrets(args)
    try:
        return _run(args)
    except ConfigError as e:  # the run directory is locked by another run
        return exit_status(e)
    except KeyboardInterrupt:  # before the training loop's own handler is in place
        return fail(128 + signal.SIGINT, "interrupted (SIGINT) while starting; checkpoints already written are "
                                         "intact - run the same command again to continue")


def held_sweep(args: list[str]):
    """`grow run -m` into a given hydra.sweep.dir: it and its members' directories locked
    before Hydra writes into them (orchestrator/commands/members.py)."""
    from orchestrator.commands.compose import parse_args
    from orchestrator.commands.members import expand, holding
    from orchestrator.commands.sweeps import explicit_sweep_dir
    cmd = parse_args(args)
    directory = explicit_sweep_dir(cmd) if cmd.multirun and not cmd.help else None
    if directory is None:
        return nullcontext()
    return holding(directory, len(expand(cmd.overrides)), cmd.overrides)


def _run(args: list[str]) -> int:
    # Imported only now, after the handlers: torch and Hydra take seconds to load, and a
    # Slurm stop signal arriving meanwhile would kill the job without a checkpoint.
    import hydra

    from orchestrator.commands.compose import explicit_run_dir, parse_args
    from orchestrator.commands.run_job import check_run, run_job
    from orchestrator.config.schema import register_schema
    from orchestrator.package_data import CONF_DIR
    from orchestrator.run.directory import check_same_run

    checked = check_run(args)
    if isinstance(checked, int):
        return checked

    def run_checked(raw_cfg) -> None:
        run_job(raw_cfg, checked)

    task = run_job if checked is None else run_checked  # a sweep's members check their own
    register_schema()
    main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(task)
    sys.argv = ["grow run", *args]
    # the run directory's lock before anything is written into it (.hydra/ by the task): a
    # second run on the same directory is refused before it overwrites anything of the first
    run_dir = explicit_run_dir(parse_args(args)) if checked is not None and first_rank() else None
    with RunLock(Path(run_dir)) if run_dir else held_sweep(args):
        if run_dir:  # a resume that would change the run is refused before .hydra/ is rewritten
            check_same_run(Path(run_dir), checked.cfg)
        main()
    return 0
