"""The work of `grow run` once its signal handlers are in place: check the config before
Hydra starts, then run it as Hydra's task.

Outside a sweep the task reuses the schedule `check_run` resolved and checked (only its run_dir
comes from Hydra); in a sweep (`-m`) every member is checked before the first one runs, and a
member run in this process reuses that check (one launched elsewhere checks its own, once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from orchestrator.commands.compose import compose, load_schedule, parse_args, run_dir_override, without_sweeps
from orchestrator.commands.configure import check_config, configure
from orchestrator.commands.members import check_members, check_reruns, checked_member, expand
from orchestrator.commands.sweeps import explicit_sweep_dir
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig
from orchestrator.engines.registry import engine_kind
from orchestrator.atomic import write_bytes_atomic
from orchestrator.exits import exit_status
from orchestrator.run.launch import fit_to_world, drive, in_launch, leave_process_group, prepare_rank
from orchestrator.run.directory import check_same_run
from orchestrator.run.lock import RunLock, first_rank
from orchestrator.run.runner import run_schedule
from orchestrator.run.sweep import sweep_member_params, swept_keys
from orchestrator.schedule import Schedule
from orchestrator.secrets import redact_config


def check_run(args: list[str]) -> Schedule | int | None:
    """What `grow run args` will run, checked before Hydra starts: its resolved schedule;
    None for help, or for a sweep (every member is checked here, before the first one runs;
    orchestrator/commands/members.py); or an exit status, after one line."""
    try:
        cmd = parse_args(args)
        if cmd.help:
            return None
        if cmd.multirun:  # the shared part once, then every member before the first one runs
            compose(without_sweeps(cmd))
            members, swept, directory = expand(cmd.overrides), swept_keys(cmd.overrides), explicit_sweep_dir(cmd)
            configs = check_members(cmd, members, swept, directory or Path("multirun"))
            if directory is not None:  # a given one may hold an earlier sweep's members
                check_reruns(configs, members, swept)
            return None
        return load_schedule(cmd, run_dir=run_dir_override(cmd), runs_here=True)
    except ConfigError as e:
        return exit_status(e)


def precheck(args: list[str]) -> RunConfig | int | None:
    """`check_run`, with the checked config in place of its schedule."""
    checked = check_run(args)
    return checked.cfg if isinstance(checked, Schedule) else checked


def record_hydra_config(raw_cfg, run_dir: str) -> None:
    """<run dir>/.hydra/{config,hydra,overrides}.yaml as Hydra writes them, but with secrets
    masked (Hydra's own copy, switched off in conf/config.yaml, would hold a tracking URI's
    password in plain text); written once the run directory's lock is held."""
    hydra_cfg = HydraConfig.get()
    files = {"config.yaml": OmegaConf.to_container(raw_cfg, resolve=False),
             "hydra.yaml": {"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)},
             "overrides.yaml": list(hydra_cfg.overrides.task)}
    for name, content in files.items():
        text = OmegaConf.to_yaml(OmegaConf.create(redact_config(content)))
        write_bytes_atomic(Path(run_dir) / ".hydra" / name, text.encode())


def run_job(raw_cfg, checked: Schedule | None = None) -> None:
    """The Hydra task: run the schedule, map known failures to an exit status and one line.
    Its run directory is locked before anything is written into it (`grow run` already holds
    it, a sweep run here holds its members'; a member launched on Slurm takes its own here)."""
    try:
        with RunLock(Path(str(raw_cfg.run_dir))) if first_rank() else contextlib.nullcontext():
            _run_job(raw_cfg, checked)
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        sys.exit(status)


def _run_job(raw_cfg, checked: Schedule | None) -> None:
    member = checked is None  # a sweep member: checked up front in this process, or now
    if member:
        checked = checked_member(raw_cfg.run_dir, list(HydraConfig.get().overrides.task))
    if checked is None:
        schedule = configure(raw_cfg, runs_here=True)
    else:
        schedule = dataclasses.replace(checked, cfg=dataclasses.replace(checked.cfg,
                                                                       run_dir=str(raw_cfg.run_dir)))
    if member and first_rank():  # a member is rerun with the settings it trained with, or refused
        check_same_run(Path(schedule.cfg.run_dir), schedule.cfg)  # before .hydra/ is rewritten
    cfg = schedule.cfg
    if first_rank():
        record_hydra_config(raw_cfg, cfg.run_dir)
    print(f"grow run: {cfg.run_dir}: preparing data, then stage {cfg.schedule.stages[0].name} ...", flush=True)
    if engine_kind(cfg.engine.name).multi_rank:
        if not in_launch():
            sys.exit(drive(cfg))  # start the ranks ourselves, one torchrun per stage
        prepare_rank(cfg)  # a rank srun/torchrun started: its environment, before DeepSpeed loads
        fitted, note = fit_to_world(cfg, int(os.environ.get("WORLD_SIZE", "0") or 0))
        if note:  # an elastic stage on fewer nodes: its layout is checked like any other
            schedule, cfg = check_config(fitted), fitted
            if first_rank():
                print(f"grow run: {note}", flush=True)
    run_schedule(cfg, extra_params=sweep_member_params(), schedule=schedule)
    leave_process_group()
