"""`grow predict predict.widths=W1,W2,W3[,...] [predict.target=SCHEDULE] [overrides]`: train
the one-stage proxy schedule at several widths on the same tokens, fit L(N) = a*N^b + c
(N: non-embedding parameters), and predict the loss of a target schedule's stages.

Each width keeps the proxy's depth, head size, ffn/hidden ratio and heads per kv head. The
sweep is `grow run -m` (locally or on Slurm with hydra/launcher=...); with 4 or more widths
the largest is also held out (fitted without it) and its relative error reported. Into
the sweep directory (hydra.sweep.dir, default predictions/<schedule>/<time>) go
`loss_fit.json` (for `grow plan plan.loss_fit=...` and `grow run plan.loss_fit=...`) and
`loss_fit.png`. Exit status: 0 a fit; 2 bad input (fewer than 3 widths, a width the head
size does not divide, a schedule with more than one stage, a proxy whose config a run
would refuse: every width is checked before the first trains) or fewer than 3 finished
proxies (one line). Each point's width is the one its proxy's run pinned (config.json).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.atomic import write_json_atomic
from orchestrator.commands.compose import CommandLine, load
from orchestrator.commands.members import check_members, check_reruns, expand, holding
from orchestrator.commands.options import UsageError
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig, ShapeConfig
from orchestrator.exits import EXIT_CONFIG, exit_status, fail
from orchestrator.budget.loss_law import (LAW, MIN_POINTS, FitError, PowerLaw, fit_with_held_out,
                                        non_embedding_parameters, plot_fit, predict)
from orchestrator.proxy.search import swept_on_command_line
from orchestrator.commands.sweeps import split_options, statuses, sweep_dir, sweep_members
from orchestrator.run.member_values import ran_config
from orchestrator.schedule import resolve, stage_spec
from orchestrator.secrets import overrides_without_secrets

SHAPE_KEY = "schedule.stages.0.shape"


def parse_widths(raw: str | None) -> list[int]:
    if raw is None:
        raise UsageError(f"predict.widths: required (e.g. predict.widths=32,48,64,96); {LAW} needs "
                         f"at least {MIN_POINTS}")
    try:
        widths = sorted({int(w) for w in raw.split(",")})
    except ValueError:
        raise UsageError(f"predict.widths: {raw!r} is not a comma-separated list of integers") from None
    if len(widths) < MIN_POINTS:
        raise UsageError(f"predict.widths: {len(widths)} width(s) given; a fit of {LAW} needs at least "
                         f"{MIN_POINTS}")
    return widths


def proxy_shapes(cfg: RunConfig, widths: list[int]) -> list[dict]:
    """The proxy's shape at each width: same depth, head size, ffn ratio and kv grouping."""
    if len(cfg.schedule.stages) != 1:
        raise UsageError(f"the proxy schedule {cfg.schedule.name!r} has {len(cfg.schedule.stages)} stages; "
                         "predict trains one-stage proxies (schedule=proxy)")
    s = cfg.schedule.stages[0].shape
    head_dim, group = s.hidden // s.heads, s.heads // (s.kv_heads or s.heads)
    shapes = []
    for w in widths:
        heads = w // head_dim
        if w % head_dim or heads % group or w <= 0:
            raise UsageError(f"predict.widths: {w} is not a multiple of the proxy's head size x kv group "
                             f"({head_dim} x {group})")
        shapes.append({"layers": s.layers, "hidden": w, "ffn": round(w * s.ffn / s.hidden), "heads": heads,
                       "kv_heads": heads // group})
    return shapes


def shape_sweep(shapes: list[dict]) -> str:
    return f"{SHAPE_KEY}=" + ",".join("{" + ",".join(f"{k}:{v}" for k, v in sh.items()) + "}" for sh in shapes)


def _member_shape(member: dict) -> dict:
    """The shape a member trained: the one its run pinned (config.json), not its launch arguments."""
    return ran_config(member["run_dir"])["schedule"]["stages"][0]["shape"]


def points_of(cfg: RunConfig, finished: list[dict]) -> list[dict]:
    """Width, N and final validation loss of each finished proxy."""
    points = []
    for m in finished:
        shape = _member_shape(m)
        stage = dataclasses.replace(cfg.schedule.stages[0], shape=ShapeConfig(**shape))
        spec = stage_spec(cfg, stage, vocab=1)  # N leaves the vocabulary out
        points.append({"width": shape["hidden"], "n": non_embedding_parameters(spec), "loss": m["final_val_loss"],
                       "tokens": m["tokens"], "member": m["member"], "run_dir": m["run_dir"]})
    return points


def predict_schedule(law: PowerLaw, cfg: RunConfig) -> dict:
    schedule = resolve(cfg)
    stages = [{"name": s.name, "n": non_embedding_parameters(s.spec), "predicted_loss": predict(law, s.spec)}
              for s in schedule]
    return {"schedule": cfg.schedule.name, "stages": stages, "final": stages[-1]}


def _prepare(args: list[str]):
    """The command line, the proxy's config, its directory, every proxy (checked: a width
    that makes a bad model is refused before any proxy trains) and the target's config."""
    opts, cmd = split_options(args, "predict.", ("widths", "target"))
    widths = parse_widths(opts.get("widths"))
    if swept_on_command_line(cmd.overrides):
        raise UsageError("swept overrides (key=a,b) are not allowed: the widths are the sweep")
    cfg = load(cmd, planning=True)
    shapes = proxy_shapes(cfg, widths)
    directory = sweep_dir(cmd, "predictions", cfg.schedule.name)
    members = expand(cmd.overrides + [shape_sweep(shapes)])  # one proxy per width
    configs = check_members(cmd, members, [SHAPE_KEY], directory)
    target = None
    if "target" in opts:
        try:
            target = load(CommandLine([f"schedule={opts['target']}"], cmd.config_dir), planning=True)
        except ConfigError as e:
            raise UsageError(f"predict.target: {e}") from None
    return cmd, cfg, shapes, directory, members, configs, target


def predict_command(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    args = overrides_without_secrets(args)  # its sweep's files and logs see references, never the values
    try:
        cmd, cfg, shapes, directory, members, configs, target = _prepare(args)
        with holding(directory, len(members), cmd.overrides):
            check_reruns(configs, members, [SHAPE_KEY])
            return _predict(cmd, cfg, shapes, directory, target)
    except UsageError as e:
        return fail(EXIT_CONFIG, f"predict: {e}")
    except ConfigError as e:
        return exit_status(e)


def _predict(cmd: CommandLine, cfg: RunConfig, shapes: list[dict], directory: Path, target) -> int:
    """The proxies' sweep, run while its directories are held, and the fit."""
    status, members, finished = sweep_members(cmd, cmd.overrides, [shape_sweep(shapes)], directory, len(shapes))
    try:
        fit = fit_with_held_out(points_of(cfg, finished))
    except FitError as e:
        return fail(EXIT_CONFIG, f"predict: {len(finished)} of {len(shapes)} proxies finished in {directory} "
                                 f"(sweep exit status {status}; {statuses(members)}): {e}")
    fit.update({"tokens": finished[0]["tokens"], "proxy_schedule": cfg.schedule.name,
                "sweep_dir": str(directory.resolve()), "sweep_exit_status": status,
                "planned": len(shapes), "partial": len(finished) < len(shapes)})
    law = PowerLaw(fit["a"], fit["b"], fit["c"])
    if target is not None:
        fit["predictions"] = predict_schedule(law, target)
    path = directory / "loss_fit.json"
    write_json_atomic(path, fit)
    plot = plot_fit(fit, directory / "loss_fit.png")
    print_fit(Console(width=140), fit, path, plot)
    return 0


def print_fit(console: Console, fit: dict, path: Path, plot: Path) -> None:
    table = Table(title=f"{LAW}: a={fit['a']:.4g} b={fit['b']:.4f} c={fit['c']:.4f} "
                        f"(N = {fit['n']}, {fit['tokens']:,} tokens each)")
    for col in ("model", "N", "val loss", "predicted"):
        table.add_column(col, justify="left" if col == "model" else "right")
    law = PowerLaw(fit["a"], fit["b"], fit["c"])
    for p in fit["points"]:
        table.add_row(f"proxy width {p['width']}", f"{p['n']:,}", f"{p['loss']:.4f}", f"{law(p['n']):.4f}")
    for s in fit.get("predictions", {}).get("stages", []):
        table.add_row(f"{fit['predictions']['schedule']}: {s['name']}", f"{s['n']:,}", "-",
                      f"{s['predicted_loss']:.4f}")
    console.print(table)
    if fit["partial"]:
        console.print(f"[yellow]warning:[/] a partial sweep: the fit uses the {len(fit['points'])} of "
                      f"{fit['planned']} proxies that finished (sweep exit status {fit['sweep_exit_status']})")
    h = fit["held_out"]
    if h:
        console.print(f"held out: the largest proxy (width {h['width']}), fitted without it: predicted "
                      f"{h['predicted']:.4f}, measured {h['loss']:.4f}, relative error {100 * h['rel_error']:.2f}%")
    else:
        console.print(f"[yellow]note:[/] {len(fit['points'])} proxies: none held out (4 or more widths give a "
                      "held-out check)")
    console.print(f"fit: {path}\nplot: {plot}\nuse it: grow plan schedule=... plan.loss_fit={path}")
