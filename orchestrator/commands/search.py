"""`grow search [search.space=NAME|FILE] [search.target=SCHEDULE] [overrides]`: sweep
hyperparameters on a proxy schedule and choose the best by final validation loss.

The space is a preset or file (orchestrator/proxy/search.py) plus any swept override on
the command line (`model.init_std=0.01,0.02`). The sweep is `grow run -m` (locally, or on
Slurm with hydra/launcher=slurm_cpu|slurm_gpu|submitit_slurm); into its directory
(hydra.sweep.dir, default searches/<schedule>/<time>) go the members' runs and
`search.json` (members, values, losses, the winner, the overrides for the target). MLflow
gets one run for the search with the members' runs as its children. Exit status: 0 a
winner; 2 a bad space or config, or no member finished (one line).

Every member is composed and checked before the first one trains (a bad value, a swept key
that has no effect, such as model.mup.* without muP, or a member whose directory holds a
run with other settings is one line); the sweep directory and the members' are locked
before anything is written into them; each member is reported with the values its run
pinned (its config.json), and a winner of a partial sweep is reported as such.
"""
from __future__ import annotations

from rich.console import Console

from orchestrator.atomic import write_json_atomic
from orchestrator.commands.compose import CommandLine, compose, without_sweeps
from orchestrator.commands.members import check_members, check_reruns, expand, holding
from orchestrator.commands.options import UsageError
from orchestrator.config.errors import ConfigError
from orchestrator.exits import EXIT_CONFIG, exit_status, fail
from orchestrator.proxy.search import apply_to, choose, load_space, log_to_mlflow, space_overrides, swept_on_command_line
from orchestrator.commands.sweeps import split_options, statuses, sweep_dir, sweep_members
from orchestrator.run.member_values import ran_values
from orchestrator.run.sweep import print_sweep
from orchestrator.secrets import overrides_without_secrets, redact_text
from orchestrator.tracking.mlflow_tracker import tracking_uri

OPTIONS = ("space", "target")


def _prepare(args: list[str]):
    """The search's options, space, shared command line, every member (checked: a bad value
    or a key that does nothing is refused before anything runs), its directory and target."""
    opts, cmd = split_options(args, "search.", OPTIONS)
    space = load_space(opts["space"], cmd.config_dir) if "space" in opts else {}
    space.update(swept_on_command_line(cmd.overrides))
    if not space:
        raise UsageError("nothing to search: give search.space=NAME|FILE or swept overrides (key=a,b)")
    base = without_sweeps(cmd)
    base.overrides = [o for o in base.overrides if o.partition("=")[0].lstrip("+~") not in space]
    directory = sweep_dir(cmd, "searches", compose(base).schedule.name)
    members = expand(base.overrides + space_overrides(space))
    configs = check_members(base, members, list(space), directory)
    target = None
    if "target" in opts:
        try:
            target = compose(CommandLine([f"schedule={opts['target']}"], base.config_dir))
        except ConfigError as e:
            raise UsageError(f"search.target: {e}") from None
    return opts, base, space, directory, members, configs, target


def search_command(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    args = overrides_without_secrets(args)  # its sweep's files and logs see references, never the values
    try:
        opts, base, space, directory, members, configs, target = _prepare(args)
        with holding(directory, len(members), base.overrides):
            check_reruns(configs, members, list(space))
            return _search(opts, base, space, directory, configs, target)
    except UsageError as e:
        return fail(EXIT_CONFIG, f"search: {e}")
    except ConfigError as e:
        return exit_status(e)


def _search(opts: dict, base: CommandLine, space: dict, directory, configs: list, target) -> int:
    """The sweep, run while its directories are held, and its report."""
    planned = len(configs)
    status, members, finished = sweep_members(base, base.overrides, space_overrides(space), directory, planned)
    for m in members:  # labelled with what each member trained (its config.json), not its launch arguments
        m["swept"] = ran_values(m["run_dir"], list(space)) or m["swept"]
    if not finished:
        return fail(EXIT_CONFIG, f"search: no member finished in {directory} (sweep exit status {status}; "
                                 f"{statuses(members)}); nothing chosen")
    winner = choose(finished)
    report = {"sweep_dir": str(directory.resolve()), "space": space, "target": opts.get("target"),
              "parametrization": configs[0].model.parametrization, "sweep_exit_status": status,
              "planned": planned, "members": members, "finished": [m["member"] for m in finished],
              "partial": len(finished) < planned, "winner": winner, "apply": apply_to(winner["swept"], target)}
    path = directory / "search.json"
    write_json_atomic(path, report)
    console = Console(width=140)
    if configs[0].tracking.enabled:
        cfg = configs[0]
        try:
            report["mlflow_run_id"] = log_to_mlflow(tracking_uri(cfg.tracking.uri),
                                                    cfg.tracking.experiment, report, path)
            write_json_atomic(path, report)
        except Exception as e:  # the search's result is on disk; tracking is a copy of it
            console.print(f"[yellow]warning:[/] MLflow: the search run was not logged "
                          f"({redact_text(str(e).splitlines()[0])})")
    _print(console, report, path)
    return 0


def _print(console: Console, report: dict, path) -> None:
    if report["sweep_exit_status"]:  # else the sweep's own end printed this table
        print_sweep({"sweep_dir": report["sweep_dir"], "members": report["members"]})
    w = report["winner"]
    finished, planned = len(report["finished"]), report["planned"]
    if report["partial"]:
        console.print(f"[yellow]warning:[/] a partial sweep: {finished} of {planned} members finished (sweep exit "
                      f"status {report['sweep_exit_status']}; {statuses(report['members'])}); the winner is the "
                      "best of those that finished, not of the space")
    of = f"best of {finished} of {planned} members, a partial sweep" if report["partial"] else f"best of {planned}"
    console.print(f"winner ({of}): member {w['member']}, final val loss {w['final_val_loss']:.4f}: "
                  + " ".join(f"{k}={v}" for k, v in w["swept"].items()))
    if report["parametrization"] != "mup":
        console.print("[yellow]note:[/] the proxy ran with the standard parametrization; values carry over to a "
                      "wider target only under muP (model.parametrization=mup, on proxy and target)")
    target = f"schedule={report['target']} " if report["target"] else ""
    console.print(f"apply to the target:\n  grow run {target}{' '.join(report['apply'])}")
    console.print(f"search: {path}")
