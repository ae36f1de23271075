"""What `grow search` and `grow predict` share: their own `prefix.key=value` options among
Hydra's overrides, a sweep run as `grow run -m` in this process (so a local sweep and one
through hydra/launcher=submitit_slurm take the existing paths), and its finished members."""
from __future__ import annotations

import math
import time
from pathlib import Path

from orchestrator.commands.compose import CommandLine, parse_args
from orchestrator.commands.options import parse_options
from orchestrator.run.sweep import collect

SWEEP_DIR = "hydra.sweep.dir"


def split_options(args: list[str], prefix: str, allowed: tuple[str, ...]) -> tuple[dict[str, str], CommandLine]:
    """(`prefix.key=value` options without the prefix, the rest as Hydra reads it)."""
    own = [a[len(prefix):] for a in args if a.startswith(prefix)]
    opts = parse_options(own, required=(), allowed=allowed)
    return opts, parse_args([a for a in args if not a.startswith(prefix)])


def explicit_sweep_dir(cmd: CommandLine) -> Path | None:
    """hydra.sweep.dir as given, if it is a plain path (else Hydra picks a new, timestamped one)."""
    for o in reversed(cmd.overrides):
        key, _, value = o.partition("=")
        if key == SWEEP_DIR:
            return Path(value) if "${" not in value else None
    return None


def sweep_dir(cmd: CommandLine, default_root: str, schedule: str) -> Path:
    """The sweep directory given, or a new one under `default_root` (one given with
    interpolations is replaced: we must know where the members are)."""
    return explicit_sweep_dir(cmd) or Path(default_root) / schedule / time.strftime("%Y-%m-%d_%H-%M-%S")


def argv(cmd: CommandLine, overrides: list[str]) -> list[str]:
    return (["--config-dir", str(cmd.config_dir)] if cmd.config_dir else []) + overrides


def run_sweep(args: list[str]) -> int:
    """`grow run -m args` here; its exit status. A member that fails ends a local sweep (the
    members after it do not run), as in `grow run -m`; the finished ones still count."""
    from orchestrator.commands.run import run_command  # loads Hydra's task path only now
    try:
        return run_command(["-m", *args])
    except SystemExit as e:  # a member's known failure (run_job) or Hydra's own report
        return e.code if isinstance(e.code, int) else 1


def finished_members(directory: Path, planned: int | None = None) -> tuple[list[dict], list[dict]]:
    """(all members found in the sweep directory - the first `planned`, when an earlier, larger
    sweep may have left more - and those that completed with a finite loss)."""
    members = collect(directory)["members"] if Path(directory).is_dir() else []
    members = [m for m in members if planned is None or m["member"] < planned]
    done = [m for m in members if m["status"] == "complete" and m.get("final_val_loss") is not None
            and math.isfinite(m["final_val_loss"])]
    return members, done


def statuses(members: list[dict]) -> str:
    return "; ".join(f"#{m['member']}: {m['status']}" for m in members) or "none ran"


def sweep_members(cmd: CommandLine, overrides: list[str], extra: list[str], directory: Path,
                  planned: int) -> tuple[int, list[dict], list[dict]]:
    """Run `grow run -m` with `overrides` (their own hydra.sweep.dir dropped) and `extra` into
    `directory`: the sweep's exit status, its `planned` members and the finished ones."""
    kept = [o for o in overrides if not o.startswith(SWEEP_DIR + "=")]
    status = run_sweep(argv(cmd, kept + extra + [f"{SWEEP_DIR}={directory}"]))
    return (status, *finished_members(directory, planned))
