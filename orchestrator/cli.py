"""`grow` command line. `grow run [overrides]` runs a growth schedule under Hydra.

Configs are checked before Hydra starts the job, so a bad key or value exits with status 2
and one line naming the key, before any data is read or model built.
"""
from __future__ import annotations

import importlib
import re
import signal
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# name -> ("module:function", help). A command function takes the remaining argv and
# returns an exit status; modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("orchestrator.cli:run_command",
            "train a growth schedule (grow run hydra.run.dir=runs/x schedule=tiny);\n"
            "          again on the same hydra.run.dir resumes where it stopped"),
}


def usage() -> str:
    lines = ["usage: grow <command> [args]", "", "commands:"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)

EXIT_CONFIG = 2
EXIT_GROWTH_CHECK = 3


def _fail(code: int, message: str) -> int:
    print(f"grow: {message}", file=sys.stderr)
    return code


def _precheck(overrides: list[str]) -> int | None:
    """Compose and validate the config as Hydra will, reporting errors in one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import register_schema
    from .validate import ConfigError, allowed_keys, load_config

    register_schema()
    job = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=job + ["run_dir=/unused"])
        load_config(cfg)
    except ConfigError as e:
        return _fail(EXIT_CONFIG, f"config error: {e}")
    except (HydraException, OmegaConfBaseException) as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        key = getattr(cause, "full_key", None)
        key = key.replace("[", ".").replace("]", "") if key else key
        first = " ".join(str(cause).split()) or type(cause).__name__
        if key and ("not in struct" in first or re.search(r"Key '\w+' not in '\w+'", first)):
            allowed = allowed_keys(key)
            first = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        first = first.split(" full_key:")[0].split(" Config search path:")[0]
        return _fail(EXIT_CONFIG, f"config error: {key + ': ' if key else ''}{first}")
    return None


def _run_job(raw_cfg) -> None:
    """The Hydra task: validate, run, map known failures to exit codes and one line."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .runner import GrowthCheckError, run_schedule
    from .stage_loop import StopRequested
    from .validate import ConfigError, load_config

    try:
        run_schedule(load_config(raw_cfg))
    except (ConfigError, DataError) as e:
        sys.exit(_fail(EXIT_CONFIG, f"config error: {e}"))
    except GrowthCheckError as e:
        sys.exit(_fail(EXIT_GROWTH_CHECK, str(e)))
    except CheckpointError as e:
        sys.exit(_fail(1, f"checkpoint error: {e}"))
    except StopRequested as e:
        sys.exit(128 + e.signum)


def run_command(args: list[str]) -> int:
    multirun = "-m" in args or "--multirun" in args
    if not multirun:  # a sweep's members are each checked by the task itself
        code = _precheck([a for a in args if not a.startswith("-")])
        if code is not None:
            return code
    import hydra

    from .config import register_schema

    register_schema()
    task = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_run_job)
    sys.argv = ["grow run", *args]
    task()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(EXIT_CONFIG, f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
    module, func = COMMANDS[command][0].split(":")
    return getattr(importlib.import_module(module), func)(rest)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
