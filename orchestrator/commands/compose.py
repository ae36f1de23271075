"""Compose and validate a command's config, once, the way `grow run` under Hydra would.

The shipped configs (orchestrator.package_data.CONF_DIR) come first on the search path,
then the user's own directory (`--config-dir DIR`, as Hydra's flag) and any
`hydra.searchpath=[...]` entries, so `schedule=mine` finds `DIR/schedule/mine.yaml`.
Every way composing can fail - an unknown key, a bad override, a YAML file that does not
parse - becomes one ConfigError line naming the key or the file and line.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.schema import RunConfig, register_schema
from orchestrator.commands.configure import configure
from orchestrator.config.errors import ConfigError
from orchestrator.config.parse import COMPOSITION_ERRORS, composition_error
from orchestrator.package_data import CONF_DIR
from orchestrator.schedule import Schedule

SEARCHPATH = "hydra.searchpath"
UNUSED_RUN_DIR = "/unused"  # run_dir defaults to Hydra's output dir, which compose() has not got


@dataclass
class CommandLine:
    """A command's arguments as Hydra reads them."""
    overrides: list[str] = field(default_factory=list)  # key=value, Hydra's own included
    config_dir: Path | None = None  # --config-dir DIR, absolute
    multirun: bool = False
    help: bool = False


def parse_args(args: list[str]) -> CommandLine:
    """Hydra's own argument parser, so a command reads its flags exactly as `grow run` does."""
    parser = get_args_parser()
    parser.exit_on_error = False  # one line, not argparse's usage text
    try:
        ns, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as e:  # a flag without its value, a bad choice
        raise ConfigError("arguments", str(e)) from None
    if unknown:
        raise ConfigError("arguments", f"unknown flag {unknown[0]!r}")
    if ns.config_path is not None or ns.config_name is not None:  # the primary config is ours
        raise ConfigError("arguments", "--config-path/--config-name are not supported; add your own "
                                       "configs with --config-dir DIR")
    config_dir = None
    if ns.config_dir is not None:
        config_dir = Path(ns.config_dir).expanduser().resolve()
        if not config_dir.is_dir():
            raise ConfigError("--config-dir", f"{ns.config_dir} is not a directory")
    return CommandLine(list(ns.overrides), config_dir, bool(ns.multirun), bool(ns.help or ns.hydra_help))


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _quoted(path: str) -> str:
    """A search path entry as Hydra's override grammar reads it (quoted only when needed)."""
    if re.fullmatch(r"[\w/:.+@~-]+", path):
        return path
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _search_entries(cmd: CommandLine) -> list[str]:
    """--config-dir, then the user's own hydra.searchpath entries."""
    entries = [f"file://{cmd.config_dir}"] if cmd.config_dir else []
    for o in cmd.overrides:
        if _key(o) == SEARCHPATH:
            try:
                value = OverridesParser.create().parse_overrides([o])[0].value()
            except HydraException as e:
                raise composition_error(e) from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(SEARCHPATH, "must be a list of paths, e.g. [file:///home/me/conf]")
            entries += value
    return entries


def search_path(cmd: CommandLine) -> str | None:
    """One `hydra.searchpath=[...]` override holding --config-dir and the user's own entries
    (None when there are neither): what compose() needs, and what a Slurm job's `grow run`
    needs to find the same configs from any directory."""
    entries = _search_entries(cmd)
    return f"{SEARCHPATH}=[{','.join(map(_quoted, entries))}]" if entries else None


def job_overrides(cmd: CommandLine) -> list[str]:
    """The overrides that shape the job's config: Hydra's own settings (hydra.run.dir,
    hydra/launcher, ...) do not, the search path does (it is re-added by search_path)."""
    return [o for o in cmd.overrides if not _key(o).startswith("hydra")]


def without_sweeps(cmd: CommandLine) -> CommandLine:
    """The command line less its swept overrides (`key=a,b`): what every member of a sweep
    shares, so a broken file or key is reported once, before the sweep starts."""
    try:
        parsed = OverridesParser.create().parse_overrides(cmd.overrides)
    except HydraException as e:
        raise composition_error(e) from None
    kept = [o for o, p in zip(cmd.overrides, parsed) if not p.is_sweep_override()]
    return dataclasses.replace(cmd, overrides=kept, multirun=False)


def _yaml_error(e: BaseException) -> yaml.MarkedYAMLError | None:
    while e is not None:
        if isinstance(e, yaml.MarkedYAMLError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _not_utf8(cmd: CommandLine, error: UnicodeDecodeError) -> ConfigError:
    """Hydra's file reader does not say which file is not text: look for it on the search path."""
    dirs = [CONF_DIR] + [Path(e[len("file://"):]) for e in _search_entries(cmd) if e.startswith("file://")]
    for d in dirs:
        for path in sorted(Path(d).rglob("*.yaml")):
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                return ConfigError(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})")
    return ConfigError("config", f"a config file is not UTF-8 text ({error.reason})")


def compose(cmd: CommandLine, run_dir: str = UNUSED_RUN_DIR):
    """The composed (unvalidated) config, or ConfigError in one line."""
    register_schema()
    overrides = job_overrides(cmd) + [f"run_dir={run_dir}"]
    sp = search_path(cmd)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            return hydra_compose("config", overrides=overrides + ([sp] if sp else []))
    except UnicodeDecodeError as e:
        raise _not_utf8(cmd, e) from None
    except (yaml.YAMLError, HydraException, OmegaConfBaseException, *COMPOSITION_ERRORS) as e:
        bad = _yaml_error(e)
        if bad is not None and bad.problem_mark is not None:
            mark = bad.problem_mark
            hint = " (YAML indents with spaces, not tabs)" if "'\\t'" in str(bad.problem) else ""
            raise ConfigError(f"{mark.name}, line {mark.line + 1}",
                              f"{bad.problem}{hint}") from None
        raise _into_null(cmd, e) or composition_error(e) from None


def _into_null(cmd: CommandLine, e: BaseException) -> ConfigError | None:
    """OmegaConf 2.3 cannot merge a mapping into a field that is null inside a list entry
    (`schedule.stages.1.moe={experts: 4}`) and fails with an AttributeError that names
    nothing; the whole entry can be set, so say how."""
    if not (isinstance(e, AttributeError) and "'NoneType' object has no attribute" in str(e)):
        return None
    for o in cmd.overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if value.lstrip().startswith("{") and "." in key:
            parent, field = key.rsplit(".", 1)
            return ConfigError(key, f"is null here, and the command line cannot merge a mapping into it; "
                                    f"set the entry whole: '{parent}={{{field}: {value.strip()}}}'")
    return None


def load_schedule(cmd: CommandLine, planning: bool = False, run_dir: str = UNUSED_RUN_DIR,
                  runs_here: bool = False) -> Schedule:
    """Compose, parse, resolve and check: the one resolved schedule a command works from
    (`planning`: layouts against the cluster; `runs_here`: also what this machine must
    provide to run it: paths, device, memory)."""
    return configure(compose(cmd, run_dir), planning=planning, runs_here=runs_here)


def load(cmd: CommandLine, planning: bool = False, run_dir: str = UNUSED_RUN_DIR,
         runs_here: bool = False) -> RunConfig:
    """`load_schedule(...)`'s checked config alone."""
    return load_schedule(cmd, planning, run_dir, runs_here).cfg


def explicit_run_dir(cmd: CommandLine) -> str | None:
    """hydra.run.dir as given, if it is a plain path (else Hydra picks a new, timestamped
    directory, which no other run can be using)."""
    for o in reversed(cmd.overrides):  # the last one wins, as in Hydra
        key, _, value = o.lstrip("+~").partition("=")
        if key == "hydra.run.dir":
            return value if "${" not in value else None
    return None


def run_dir_override(cmd: CommandLine) -> str:
    """The run directory `grow run` will use, to check it before Hydra creates it: the
    hydra.run.dir override, else the default's parent (runs/<schedule>/)."""
    return explicit_run_dir(cmd) or "runs/${schedule.name}"

