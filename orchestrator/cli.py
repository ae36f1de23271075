"""`grow` command line. `grow run [overrides]` runs a growth schedule under Hydra.

Configs are checked before Hydra starts the job, so a bad key or value exits with status 2
and one line naming the key, before any data is read or model built.
"""
from __future__ import annotations

import errno
import importlib
import os
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
    "plan": ("orchestrator.commands.plan:plan_command",
             "cost of a schedule before it runs: per stage and vs from scratch, budget check\n"
             "          (grow plan schedule=flm101b cluster=a800_192 [budget.max_usd=N plan.fit=true])"),
    "submit": ("orchestrator.commands.submit:submit_command",
               "one chained Slurm job per stage (grow submit hydra.run.dir=runs/x [submit.dry_run=true])"),
    "status": ("orchestrator.slurm.status:status_command",
               "a submitted run's stages: job ids, state, requeues, tokens, spend (grow status run_dir=DIR)"),
    "grow": ("orchestrator.offline.expand:grow_command",
             "grow a checkpoint on disk, tensor by tensor (grow grow ckpt=SRC out=DST growth=clone\n"
             "          hidden=256 ffn=1024 [layers= heads= kv_heads= layer_insert= init= moments= seed=])"),
    "expand": ("orchestrator.offline.expand:grow_command", "same as grow grow"),
    "import-hf": ("orchestrator.offline.hf:import_command",
                  "Hugging Face Llama -> canonical checkpoint (grow import-hf src=HF_DIR out=CKPT)"),
    "export-hf": ("orchestrator.offline.hf:export_command",
                  "canonical checkpoint -> LlamaForCausalLM dir (grow export-hf ckpt=CKPT out=HF_DIR)"),
}


def usage() -> str:
    lines = ["usage: grow <command> [args]", "", "commands:"]
    width = max(map(len, COMMANDS)) + 2
    lines += [f"  {name:<{width}}{help_.replace(chr(10) + ' ' * 10, chr(10) + ' ' * (width + 2))}"
              for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)

EXIT_CONFIG = 2
EXIT_GROWTH_CHECK = 3


def _fail(code: int, message: str) -> int:
    print(f"grow: {message}", file=sys.stderr)
    return code


def _run_dir_override(overrides: list[str]) -> str:
    """The run directory `grow run` will use, for checking it before Hydra creates it: the
    hydra.run.dir override, else the default's parent (runs/<schedule>/)."""
    for o in reversed(overrides):  # the last one wins, as in Hydra
        key, _, value = o.lstrip("+~").partition("=")
        if key == "hydra.run.dir":
            return value if "${" not in value else "runs/${schedule.name}"
    return "runs/${schedule.name}"


def _precheck(overrides: list[str], run_here: bool = False) -> int | None:
    """Compose and validate the config as Hydra will, reporting errors in one line;
    `run_here`: also what this machine must provide (paths, device, memory)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.config.schema import register_schema
    from orchestrator.config.validate import COMPOSITION_ERRORS, ConfigError, composition_error, load_config

    register_schema()
    job = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            run_dir = _run_dir_override(overrides) if run_here else "/unused"
            cfg = compose("config", overrides=job + [f"run_dir={run_dir}"])
        load_config(cfg, runs_here=run_here)
    except ConfigError as e:
        return _fail(EXIT_CONFIG, f"config error: {e}")
    except (HydraException, OmegaConfBaseException, *COMPOSITION_ERRORS) as e:
        return _fail(EXIT_CONFIG, f"config error: {composition_error(e)}")
    return None


def _run_job(raw_cfg) -> None:
    """The Hydra task: validate, run, map known failures to exit codes and one line."""
    from orchestrator.checkpoint.canonical import CheckpointError
    from orchestrator.data import DataError
    from orchestrator.run.runner import GrowthCheckError, run_schedule
    from orchestrator.run.stage_loop import StopRequested
    from orchestrator.config.validate import ConfigError, load_config

    from orchestrator.run.sweep import sweep_member_params

    try:
        cfg = load_config(raw_cfg, runs_here=True)
        print(f"grow run: {cfg.run_dir}: preparing data, then stage {cfg.schedule.stages[0].name} ...", flush=True)
        if cfg.engine.name == "deepspeed":
            from orchestrator.run.launch import drive, in_launch

            if not in_launch():  # start the ranks ourselves, one torchrun per stage
                sys.exit(drive(cfg))
        run_schedule(cfg, extra_params=sweep_member_params())
    except (ConfigError, DataError) as e:
        sys.exit(_fail(EXIT_CONFIG, f"config error: {e}"))
    except GrowthCheckError as e:
        sys.exit(_fail(EXIT_GROWTH_CHECK, str(e)))
    except CheckpointError as e:
        sys.exit(_fail(1, f"checkpoint error: {e}"))
    except StopRequested as e:
        sys.exit(128 + e.signum)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        sys.exit(_fail(1, f"disk full: {e.strerror} writing {e.filename or 'a file'}; "
                          "checkpoints already written are intact - free space and run again"))


def _no_world_writable_files() -> None:
    """Whatever umask we were started with, nothing we write is group/world-writable."""
    os.umask(os.umask(0o022) | 0o022)


def run_command(args: list[str]) -> int:
    _no_world_writable_files()
    from orchestrator.run.signals import install_early_handlers

    install_early_handlers()  # a Slurm signal during startup becomes a checkpoint, not a kill
    multirun = "-m" in args or "--multirun" in args
    if not multirun:  # a sweep's members are each checked by the task itself
        code = _precheck([a for a in args if not a.startswith("-")], run_here=True)
        if code is not None:
            return code
    import hydra

    from orchestrator.config.schema import register_schema

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
