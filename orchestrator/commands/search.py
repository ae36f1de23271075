"""`grow search [search.space=NAME|FILE] [search.target=SCHEDULE] [overrides]`: sweep
hyperparameters on a proxy schedule and choose the best by final validation loss.

The space is a preset or file (orchestrator/proxy/search.py) plus any swept override on
the command line (`model.init_std=0.01,0.02`). The sweep is `grow run -m` (locally, or on
Slurm with hydra/launcher=slurm_cpu|slurm_gpu|submitit_slurm); into its directory
(hydra.sweep.dir, default searches/<schedule>/<time>) go the members' runs and
`search.json` (members, values, losses, the winner, the overrides for the target). MLflow
gets one run for the search with the members' runs as its children. Exit status: 0 a
winner; 2 a bad space or config, or no member finished (one line).
"""
from __future__ import annotations

import math

from rich.console import Console

from orchestrator.atomic import write_json_atomic
from orchestrator.commands.compose import CommandLine, compose, load, without_sweeps
from orchestrator.commands.options import UsageError
from orchestrator.config.errors import ConfigError
from orchestrator.exits import EXIT_CONFIG, exit_status, fail
from orchestrator.proxy.search import (apply_to, choose, first_member, load_space, log_to_mlflow, parametrization,
                                       space_overrides, swept_on_command_line)
from orchestrator.commands.sweeps import split_options, statuses, sweep_dir, sweep_members
from orchestrator.run.sweep import print_sweep
from orchestrator.tracking.mlflow_tracker import default_tracking_uri

OPTIONS = ("space", "target")


def _prepare(args: list[str]):
    opts, cmd = split_options(args, "search.", OPTIONS)
    space = load_space(opts["space"], cmd.config_dir) if "space" in opts else {}
    space.update(swept_on_command_line(cmd.overrides))
    if not space:
        raise UsageError("nothing to search: give search.space=NAME|FILE or swept overrides (key=a,b)")
    base = without_sweeps(cmd)
    base.overrides = [o for o in base.overrides if o.partition("=")[0].lstrip("+~") not in space]
    shared = load(CommandLine(base.overrides + first_member(space), base.config_dir), planning=True)
    target = None
    if "target" in opts:
        try:
            target = compose(CommandLine([f"schedule={opts['target']}"], base.config_dir))
        except ConfigError as e:
            raise UsageError(f"search.target: {e}") from None
    return opts, cmd, base, space, shared, target


def search_command(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    try:
        opts, cmd, base, space, cfg, target = _prepare(args)
    except UsageError as e:
        return fail(EXIT_CONFIG, f"search: {e}")
    except ConfigError as e:
        return exit_status(e)
    directory = sweep_dir(cmd, "searches", cfg.schedule.name)
    status, members, finished = sweep_members(cmd, base.overrides, space_overrides(space), directory)
    if not finished:
        return fail(EXIT_CONFIG, f"search: no member finished in {directory} (sweep exit status {status}; "
                                 f"{statuses(members)}); nothing chosen")
    winner = choose(finished)
    planned = math.prod(len(v) for v in space.values())
    report = {"sweep_dir": str(directory.resolve()), "space": space, "target": opts.get("target"),
              "parametrization": parametrization(compose(base)), "sweep_exit_status": status,
              "planned": planned, "members": members, "finished": [m["member"] for m in finished],
              "winner": winner, "apply": apply_to(winner["swept"], target)}
    path = directory / "search.json"
    write_json_atomic(path, report)
    console = Console(width=140)
    if cfg.tracking.enabled:
        try:
            report["mlflow_run_id"] = log_to_mlflow(cfg.tracking.uri or default_tracking_uri(),
                                                    cfg.tracking.experiment, report, path)
            write_json_atomic(path, report)
        except Exception as e:  # the search's result is on disk; tracking is a copy of it
            console.print(f"[yellow]warning:[/] MLflow: the search run was not logged ({str(e).splitlines()[0]})")
    _print(console, report, path)
    return 0


def _print(console: Console, report: dict, path) -> None:
    if report["sweep_exit_status"]:  # else the sweep's own end printed this table
        print_sweep({"sweep_dir": report["sweep_dir"], "members": report["members"]})
    w = report["winner"]
    ran = len(report["members"])
    if ran < report["planned"] or report["sweep_exit_status"]:
        console.print(f"[yellow]warning:[/] {ran} of {report['planned']} members ran and "
                      f"{len(report['finished'])} finished (sweep exit status {report['sweep_exit_status']}): "
                      "a member that fails ends a local sweep; the winner is the best of those that finished")
    console.print(f"winner: member {w['member']}, final val loss {w['final_val_loss']:.4f}: "
                  + " ".join(f"{k}={v}" for k, v in w["swept"].items()))
    if report["parametrization"] != "mup":
        console.print("[yellow]note:[/] the proxy ran with the standard parametrization; values carry over to a "
                      "wider target only under muP (model.parametrization=mup, on proxy and target)")
    target = f"schedule={report['target']} " if report["target"] else ""
    console.print(f"apply to the target:\n  grow run {target}{' '.join(report['apply'])}")
    console.print(f"search: {path}")
