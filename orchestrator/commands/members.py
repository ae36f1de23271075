"""Every member of a sweep, known and checked before the first one trains (`grow run -m`,
`grow search`, `grow predict`), and the sweep's directories held while it runs.

The members are expanded as Hydra's basic sweeper launches them (a member's number is its
index), and each is composed and put through the checks `grow run` runs, in this process: a
bad value in member 5 is one line before member 0 trains, not a sweep that stops half way
with a "winner" of the half. Refused as well: a member whose directory holds a different run
(a rerun of a sweep with other values), a swept setting that has no effect where it is set
(orchestrator/proxy/inert.py), and two members that are the same run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from orchestrator.commands.compose import CommandLine, job_overrides, load_schedule
from orchestrator.config.errors import ConfigError
from orchestrator.config.parse import composition_error
from orchestrator.config.schema import RunConfig
from orchestrator.proxy.inert import inert_reason
from orchestrator.run.directory import check_same_run
from orchestrator.run.lock import RunLock
from orchestrator.schedule import Schedule

LAUNCHER = "hydra/launcher"
SUBDIR = "hydra.sweep.subdir"  # a member's directory in the sweep's: its number unless set
# Members checked up front, by (run directory, job overrides): a member that then starts in
# this process (Hydra's basic launcher) takes its schedule from here instead of checking again.
_checked: dict[tuple[str, tuple[str, ...]], Schedule] = {}


def _member_key(run_dir, overrides: list[str]) -> tuple[str, tuple[str, ...]]:
    return str(Path(str(run_dir)).resolve()), tuple(job_overrides(CommandLine(list(overrides))))


def checked_member(run_dir, overrides: list[str]) -> Schedule | None:
    """The schedule checked up front for the member with these job overrides in `run_dir`
    (once: a rerun checks again), or None."""
    return _checked.pop(_member_key(run_dir, overrides), None)


def expand(overrides: list[str]) -> list[list[str]]:
    """Each member's overrides, in the order Hydra's basic sweeper numbers them."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        return [member for batch in BasicSweeper.split_arguments(parsed, None) for member in batch]
    except HydraException as e:  # a malformed override, or a sweep kind the sweeper cannot expand
        raise composition_error(e) from None


def launched_here(overrides: list[str]) -> bool:
    """Whether the members run in this process (Hydra's basic launcher), not on Slurm."""
    chosen = [o.partition("=")[2] for o in overrides if o.lstrip("+~").partition("=")[0] == LAUNCHER]
    return not chosen or chosen[-1] == "basic"


def _label(member: list[str], swept: list[str]) -> str:
    values = [o for o in member if o.lstrip("+~").partition("=")[0] in swept]
    return " ".join(values) or "no swept value"


def _where(i: int, members: list[list[str]], swept: list[str]) -> str:
    return f"sweep member {i} of {len(members)}: {_label(members[i], swept)}"


def _naming_member(e: ConfigError, where: str) -> ConfigError:
    return ConfigError(e.key, f"{str(e)[len(e.key) + 2:]} ({where})")


def check_members(cmd: CommandLine, members: list[list[str]], swept: list[str],
                  sweep_dir: Path) -> list[RunConfig]:
    """Each member's checked config (as its run will check it, with its run directory under
    `sweep_dir`), or ConfigError naming the member. `swept`: the keys that vary, or that a
    search sets. Reads nothing in the members' directories (see check_reruns)."""
    runs_here = launched_here(cmd.overrides)
    configs: list[RunConfig] = []
    seen: dict[str, int] = {}
    for i, member in enumerate(members):
        where = _where(i, members, swept)
        run_dir = Path(sweep_dir) / str(i)
        key = _member_key(run_dir, member)
        try:
            if key not in _checked:
                _checked[key] = load_schedule(CommandLine(member, cmd.config_dir), runs_here=runs_here,
                                              run_dir=str(run_dir))
        except ConfigError as e:
            raise _naming_member(e, where) from None
        cfg = _checked[key].cfg
        for setting in swept:
            why = inert_reason(setting, cfg)
            if why is not None:
                raise ConfigError(setting, f"swept, but it has no effect with {why} ({where}); drop it from the sweep")
        same = json.dumps(dataclasses.asdict(dataclasses.replace(cfg, run_dir="")), sort_keys=True, default=str)
        if same in seen:
            raise ConfigError("sweep", f"members {seen[same]} and {i} are the same run "
                                       f"({_label(members[seen[same]], swept)} and {_label(member, swept)}); "
                                       "give each value once")
        seen[same] = i
        configs.append(cfg)
    return configs


def check_reruns(configs: list[RunConfig], members: list[list[str]], swept: list[str]) -> None:
    """A member whose run directory holds a run with other settings (a sweep rerun into the
    same directory with other values) is refused, as `grow run` refuses such a resume; one
    with the same settings is resumed, or reused if it finished. Read-only."""
    for i, cfg in enumerate(configs):
        try:
            check_same_run(Path(cfg.run_dir), cfg)
        except ConfigError as e:
            raise _naming_member(e, _where(i, members, swept)) from None


@contextlib.contextmanager
def holding(sweep_dir: Path, members: int, overrides: list[str]):
    """The sweep directory locked, and when the members run in this process each member's
    too, before Hydra writes anything into them (multirun.yaml, .hydra/, the member's log): a
    second sweep into the same directory is refused with nothing of the first overwritten.
    A member launched elsewhere (Slurm), or in a directory of its own naming
    (hydra.sweep.subdir), locks its directory when it starts."""
    numbered = not any(o.lstrip("+~").startswith(SUBDIR + "=") for o in overrides)
    with contextlib.ExitStack() as held:
        held.enter_context(RunLock(sweep_dir, setting="hydra.sweep.dir"))
        for i in range(members if numbered and launched_here(overrides) else 0):
            held.enter_context(RunLock(Path(sweep_dir) / str(i), setting="hydra.sweep.dir"))
        yield
