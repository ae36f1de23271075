"""`grow predict predict.widths=W1,W2,W3[,...] [predict.tokens=D1,D2,...] [predict.seeds=S1,S2,...]
[predict.target=SCHEDULE] [overrides]`: train the one-stage proxy schedule over a grid of
widths x token counts x seeds, fit L(N, D) = E + A/N^alpha + B/D^beta (N: non-embedding
parameters, D: training tokens) with bootstrap intervals, and predict the loss at the end
of each stage of a target schedule (a grown one through the tokens each stage carries),
with an interval. One token count: the fixed-token law L(N) = E + A/N^alpha.

Each width keeps the proxy's depth, head size, ffn/hidden ratio and heads per kv head. The
sweep is `grow run -m` (locally or on Slurm with hydra/launcher=...; finished members are
reused on a rerun). With 4 or more widths the widest are also held out (fitted without
them), and with 4 or more token counts the longest runs. Into the sweep directory
(hydra.sweep.dir, default predictions/<schedule>/<time>) go `loss_fit.json` (parameters,
intervals, points, bootstrap laws, held-out checks, the verdict; for `grow plan
plan.loss_fit=...` and `grow run plan.loss_fit=...`) and `loss_fit.png`.

A fit is not a law when a parameter sits at its bound or a parameter's 95% interval is
wider than predict.max_interval (default 1.0) times its value: it is written, and grow
predict exits 5 with one line, unless predict.keep_unlawful=true; grow plan shows no
prediction from it. predict.bootstrap: the bootstrap's samples (default 400);
predict.growth_correction: the relative correction of a grown schedule's final loss,
measured on small grown schedules (bench/loss_prediction.py). predict.form=kaplan fits
Kaplan et al.'s L(N, D) = (A/N^alpha + B/D)^beta instead, which has no irreducible term:
for proxies far above the loss floor, where the Chinchilla fit puts E on its bound.
Exit status: 0 a law (or one kept); 5 not a law; 2 bad input (fewer than 3 widths, a width
the head size does not divide, a schedule with more than one stage, a proxy whose config a
run would refuse: every member is checked before the first trains) or too few finished
proxies to fit (one line). Each point's width, tokens and seed are the ones its run pinned.
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
from orchestrator.commands.options import bool_option, float_option, int_option
from orchestrator.exits import EXIT_CONFIG, EXIT_NOT_A_LAW, exit_status, fail
from orchestrator.budget.law_fit import BOOTSTRAP_SAMPLES, FORMS, MAX_INTERVAL, fit_report
from orchestrator.budget.loss_law import (LAW, MIN_SIZES, FitError, law_of, non_embedding_parameters, plot_fit,
                                        schedule_prediction)
from orchestrator.proxy.search import swept_on_command_line
from orchestrator.commands.sweeps import split_options, statuses, sweep_dir, sweep_members
from orchestrator.run.member_values import ran_config
from orchestrator.schedule import resolve, stage_spec
from orchestrator.secrets import overrides_without_secrets

SHAPE_KEY = "schedule.stages.0.shape"
TOKENS_KEY = "schedule.stages.0.tokens"
OPTIONS = ("widths", "tokens", "seeds", "target", "keep_unlawful", "max_interval", "bootstrap",
           "growth_correction", "form")
SEED_KEY = "seed"


def parse_widths(raw: str | None) -> list[int]:
    if raw is None:
        raise UsageError(f"predict.widths: required (e.g. predict.widths=32,48,64,96); {LAW} needs "
                         f"at least {MIN_SIZES}")
    try:
        widths = sorted({int(w) for w in raw.split(",")})
    except ValueError:
        raise UsageError(f"predict.widths: {raw!r} is not a comma-separated list of integers") from None
    if len(widths) < MIN_SIZES:
        raise UsageError(f"predict.widths: {len(widths)} width(s) given; a fit of {LAW} needs at least "
                         f"{MIN_SIZES}")
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


def parse_ints(key: str, raw: str | None, minimum: int) -> list[int]:
    """A comma-separated list of distinct integers >= minimum, sorted ([] when not given)."""
    if raw is None:
        return []
    try:
        values = sorted({int(v) for v in raw.split(",")})
    except ValueError:
        raise UsageError(f"predict.{key}: {raw!r} is not a comma-separated list of integers") from None
    if values[0] < minimum:
        raise UsageError(f"predict.{key}: {values[0]} is not allowed; allowed: >= {minimum}")
    return values


def grid_sweep(shapes: list[dict], tokens: list[int], seeds: list[int]) -> list[str]:
    """The sweep over the grid: every width x token count x seed, in this order (a member's
    number depends on it, and a rerun reuses the members by number)."""
    return ([shape_sweep(shapes)] + ([f"{TOKENS_KEY}=" + ",".join(map(str, tokens))] if tokens else [])
            + ([f"{SEED_KEY}=" + ",".join(map(str, seeds))] if seeds else []))


def swept_keys(tokens: list[int], seeds: list[int]) -> list[str]:
    return [SHAPE_KEY] + [TOKENS_KEY] * bool(tokens) + [SEED_KEY] * bool(seeds)


def _member_shape(member: dict) -> dict:
    """The shape a member trained: the one its run pinned (config.json), not its launch arguments."""
    return ran_config(member["run_dir"])["schedule"]["stages"][0]["shape"]


def points_of(cfg: RunConfig, finished: list[dict]) -> list[dict]:
    """Width, N, tokens, seed and final validation loss of each finished proxy (as its run
    pinned them)."""
    points = []
    for m in finished:
        ran = ran_config(m["run_dir"])
        shape = ran["schedule"]["stages"][0]["shape"]
        stage = dataclasses.replace(cfg.schedule.stages[0], shape=ShapeConfig(**shape))
        spec = stage_spec(cfg, stage, vocab=1)  # N leaves the vocabulary out
        points.append({"width": shape["hidden"], "n": non_embedding_parameters(spec), "loss": m["final_val_loss"],
                       "tokens": m["tokens"], "seed": ran.get("seed"), "member": m["member"],
                       "run_dir": m["run_dir"]})
    return points


@dataclasses.dataclass
class Request:
    """What `grow predict` was asked: the proxies' grid, the target, and how a fit is judged."""
    widths: list[int]
    tokens: list[int]  # [] the proxy's own token count
    seeds: list[int]  # [] the config's seed
    target: str | None
    keep_unlawful: bool
    max_interval: float
    bootstrap: int
    growth_correction: float
    form: str


def parse_request(opts: dict[str, str]) -> Request:
    return Request(widths=parse_widths(opts.get("widths")), tokens=parse_ints("tokens", opts.get("tokens"), 1),
                   seeds=parse_ints("seeds", opts.get("seeds"), 0), target=opts.get("target"),
                   keep_unlawful=bool_option(opts, "keep_unlawful", False),
                   max_interval=float_option(opts, "max_interval", MAX_INTERVAL),
                   bootstrap=int_option(opts, "bootstrap", BOOTSTRAP_SAMPLES, minimum=20),
                   growth_correction=float_option(opts, "growth_correction", 0.0, minimum=-0.5),
                   form=_form(opts.get("form", FORMS[0])))


def _form(raw: str) -> str:
    if raw not in FORMS:
        raise UsageError(f"predict.form: {raw!r} is not allowed; allowed: {', '.join(FORMS)}")
    return raw


def _prepare(args: list[str]):
    """The command line, the request, the proxy's config, its directory, every proxy
    (checked: a width that makes a bad model is refused before any proxy trains) and the
    target's config."""
    opts, cmd = split_options(args, "predict.", OPTIONS)
    req = parse_request(opts)
    if swept_on_command_line(cmd.overrides):
        raise UsageError("swept overrides (key=a,b) are not allowed: predict.widths, predict.tokens and "
                         "predict.seeds are the sweep")
    cfg = load(cmd, planning=True)
    shapes = proxy_shapes(cfg, req.widths)
    directory = sweep_dir(cmd, "predictions", cfg.schedule.name)
    members = expand(cmd.overrides + grid_sweep(shapes, req.tokens, req.seeds))
    configs = check_members(cmd, members, swept_keys(req.tokens, req.seeds), directory)
    target = None
    if req.target is not None:
        try:
            target = load(CommandLine([f"schedule={req.target}"], cmd.config_dir), planning=True)
        except ConfigError as e:
            raise UsageError(f"predict.target: {e}") from None
    return cmd, req, cfg, shapes, directory, members, configs, target


def predict_command(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    args = overrides_without_secrets(args)  # its sweep's files and logs see references, never the values
    try:
        cmd, req, cfg, shapes, directory, members, configs, target = _prepare(args)
        with holding(directory, len(members), cmd.overrides):
            check_reruns(configs, members, swept_keys(req.tokens, req.seeds))
            return _predict(cmd, req, cfg, shapes, directory, len(members), target)
    except UsageError as e:
        return fail(EXIT_CONFIG, f"predict: {e}")
    except ConfigError as e:
        return exit_status(e)


def _predict(cmd: CommandLine, req: Request, cfg: RunConfig, shapes: list[dict], directory: Path,
             planned: int, target) -> int:
    """The proxies' sweep, run while its directories are held, the fit and its verdict."""
    status, members, finished = sweep_members(cmd, cmd.overrides, grid_sweep(shapes, req.tokens, req.seeds),
                                              directory, planned)
    try:
        fit = fit_report(points_of(cfg, finished), samples=req.bootstrap, max_interval=req.max_interval,
                         form=req.form)
    except FitError as e:
        return fail(EXIT_CONFIG, f"predict: {len(finished)} of {planned} proxies finished in {directory} "
                                 f"(sweep exit status {status}; {statuses(members)}): {e}")
    fit.update({"proxy_schedule": cfg.schedule.name, "parametrization": cfg.model.parametrization,
                "sweep_dir": str(directory.resolve()), "sweep_exit_status": status, "planned": planned,
                "partial": len(finished) < planned, "growth_correction": req.growth_correction,
                "kept_unlawful": bool(req.keep_unlawful and not fit["lawful"])})
    if target is not None:
        fit["predictions"] = predict_schedule(fit, target)
    path = directory / "loss_fit.json"
    write_json_atomic(path, fit)
    plot = plot_fit(fit, directory / "loss_fit.png")
    print_fit(Console(width=140), fit, path, plot)
    if not fit["lawful"] and not req.keep_unlawful:
        return fail(EXIT_NOT_A_LAW, f"predict: not a law: {fit['verdict']} ({path}; keep it with "
                                    "predict.keep_unlawful=true)")
    return 0


def predict_schedule(fit: dict, cfg: RunConfig) -> dict:
    """Each stage's predicted loss at the end of the stage (the law at its size and the tokens
    it carries; a grown schedule through growth_prediction), with its interval."""
    stages = [(s.name, non_embedding_parameters(s.spec), s.tokens) for s in resolve(cfg)]
    predicted = schedule_prediction(fit, [(n, d) for _, n, d in stages])
    rows = [{"name": name, "n": n, "tokens": d, **p} for (name, n, d), p in zip(stages, predicted)]
    return {"schedule": cfg.schedule.name, "stages": rows, "final": rows[-1]}


def print_fit(console: Console, fit: dict, path: Path, plot: Path) -> None:
    params = "  ".join(f"{k}={v['value']:.4g} [{v['lo']:.4g}, {v['hi']:.4g}]" for k, v in fit["parameters"].items())
    table = Table(title=f"{fit['law']}: {params} (95% bootstrap intervals, N = {fit['n']})")
    for col in ("model", "N", "tokens", "val loss (mean of seeds)", "fit"):
        table.add_column(col, justify="left" if col == "model" else "right")
    law = law_of(fit)
    for p in fit["points"]:
        table.add_row(f"proxy width {p['width']}", f"{p['n']:,}", f"{p['tokens']:,}",
                      f"{p['loss']:.4f} ({len(p['seed_losses'])})", f"{law(p['n'], p['tokens']):.4f}")
    for s in fit.get("predictions", {}).get("stages", []):
        table.add_row(f"{fit['predictions']['schedule']}: {s['name']}", f"{s['n']:,}", f"{s['tokens']:,}", "-",
                      f"{s['predicted_loss']:.4f} [{s['lo']:.4f}, {s['hi']:.4f}]")
    console.print(table)
    if fit["partial"]:
        console.print(f"[yellow]warning:[/] a partial sweep: the fit uses the proxies that finished, "
                      f"{fit['finished']} of {fit['planned']} (sweep exit status {fit['sweep_exit_status']})")
    for h in fit["held_out"]:
        console.print(f"held out: {h['what']}, fitted without it: predicted {h['predicted']:.4f}, measured "
                      f"{h['loss']:.4f}, relative error {100 * h['rel_error']:.2f}%")
    if not fit["held_out"]:
        console.print("[yellow]note:[/] no held-out check (4 or more widths, or 4 or more token counts, give one)")
    console.print(f"verdict: {'a law' if fit['lawful'] else 'NOT a law'}: {fit['verdict']}")
    console.print(f"fit: {path}\nplot: {plot}")
    if fit["lawful"]:
        console.print(f"use it: grow plan schedule=... plan.loss_fit={path}")
