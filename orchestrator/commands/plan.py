"""`grow plan [overrides]`: what a schedule will cost, before anything runs.

Composes the same config `grow run` would (Hydra's compose API; no data read, no model
built), prints a table per stage and in total against training the final model from
scratch, and writes `plan.json` into hydra.run.dir (default plans/<schedule>/<time>).
Exit status: 0 the plan fits its budget, 2 a bad config, an impossible layout or a budget
too small to fit (one line naming the key), 4 the plan is over a budget cap.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.atomic import write_json_atomic
from orchestrator.secrets import redact_config
from orchestrator.budget.memory import GIB
from orchestrator.budget.caps import CAPS
from orchestrator.budget.planner import make_plan
from orchestrator.commands.compose import CommandLine, load, load_schedule, parse_args
from orchestrator.commands.configure import check_config
from orchestrator.config.schema import RunConfig
from orchestrator.config.errors import ConfigError
from orchestrator.exits import EXIT_OVER_BUDGET, exit_status


def compose_config(overrides: list[str]) -> RunConfig:
    """The validated config `grow plan overrides` plans (for benchmarks and tests)."""
    return load(CommandLine(list(overrides)), planning=True)


def _run_dir(args: list[str], schedule: str) -> Path:
    for a in args:
        if a.startswith("hydra.run.dir="):
            return Path(a.split("=", 1)[1])
    return Path("plans") / schedule / time.strftime("%Y-%m-%d_%H-%M-%S")


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def _usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:,.4g}"


def _params(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _predicted(stage) -> str:
    lo, hi = stage.predicted_interval
    return f"{stage.predicted_loss:.4f} [{lo:.4f}, {hi:.4f}]"


def _total_active(total: int, active: int | None) -> str:
    """Total parameters, and the active ones where they differ (a mixture of experts)."""
    if active is None or active == total:
        return _params(total)
    return f"{_params(total)}\n({_params(active)} active)"


def print_plan(console: Console, plan, path: Path, overrides: list[str] = ()) -> None:
    p = plan
    title = (f"Plan: schedule {p.schedule} on cluster {p.cluster}"
             + (f", recompute={p.recompute}" if p.recompute != "none" else ""))
    table = Table(title=title)
    predicted = any(s.predicted_loss is not None for s in p.stages)  # plan.loss_fit given
    for col in ("stage", "params", "layers x hidden (heads)", "tokens", "steps", "tp/pp/dp", "GPUs", "nodes",
                "FLOPs", "TFLOP/s/GPU", "GPU-hours", "days", "USD", "states GiB/GPU") + (("pred. loss",) * predicted):
        table.add_column(col, justify="left" if col in ("stage", "layers x hidden (heads)") else "right")
    for s in p.stages:
        lay = s.layout
        shape = f"{s.shape['layers']} x {s.shape['hidden']} ({s.shape['heads']})"
        if s.experts:
            shape += f"\n{s.experts} experts"
        table.add_row(s.name, _total_active(s.params, s.active_params), shape,
                      _params(s.tokens), f"{s.steps:,}", f"{lay['tp']}/{lay['pp']}/{lay['dp']}", str(s.gpus),
                      str(s.nodes), f"{s.flops:.3e}", f"{s.tflops_per_gpu:.4g}" + ("" if s.throughput == "measured" else "*"),
                      _num(s.gpu_hours), f"{s.days:.3g}", _usd(s.usd), f"{s.state_gib_per_gpu:.3g}",
                      *([_predicted(s)] if predicted else []))
    t, sc = p.totals, p.scratch
    table.add_section()
    table.add_row("[bold]total[/]", "", "", _params(t["tokens"]), "", "", "", "", f"{t['flops']:.3e}", "",
                  _num(t["gpu_hours"]), f"{t['days']:.3g}", _usd(t["usd"]), "", *([""] * predicted))
    lay = sc["layout"]
    table.add_row("from scratch", _total_active(sc["params"], sc.get("active_params")), "final shape", _params(sc["tokens"]), "",
                  f"{lay['tp']}/{lay['pp']}/{lay['dp']}", str(sc["gpus"]), str(sc["nodes"]), f"{sc['flops']:.3e}", "",
                  _num(sc["gpu_hours"]), f"{sc['days']:.3g}", _usd(sc["usd"]), "", *([""] * predicted))
    if p.loss_fit_note:  # what the column means, or why there is none (a fit that is not a law)
        console.print(p.loss_fit_note)
    console.print(table)
    for s in p.stages:
        if s.transition:
            tr = s.transition
            console.print(f"growth {tr['from']} -> {s.name}: reads {tr['bytes_read'] / GIB:,.1f} GiB, writes "
                          f"{tr['bytes_written'] / GIB:,.1f} GiB, peak {tr['peak_gib_per_gpu']:.3g} GiB per GPU and "
                          f"{tr['peak_gib_per_host']:.3g} GiB per host, {tr['seconds'] / 60:,.1f} min at "
                          f"cluster.storage_gbps")
    if any(s.throughput != "measured" for s in p.stages):
        console.print("* TFLOP/s per GPU = cluster.peak_tflops_per_gpu x cluster.expected_mfu (not measured)")
    console.print(f"growth saves [bold]{p.saving_pct:.1f}%[/] of the cost of training the final model from "
                  f"scratch on the same {_params(t['tokens'])} tokens ({_usd(t['usd'])} vs {_usd(sc['usd'])}, "
                  f"{t['days']:.3g} vs {sc['days']:.3g} days; {p.saving_pct_flops:.1f}% of the FLOPs)")
    if p.measured:  # what growth saved when measured at these tokens per parameter (issue 27)
        console.print(p.measured["note"], markup=False)
    if p.fit:
        f = p.fit
        console.print(f"fitted to the budget (rule {f['rule']}): tokens x {f['factor']:.4g}; steps "
                      f"{f['original_steps']} -> {f['steps']}; run it with:\n  grow run "
                      + " ".join([o for o in overrides if not o.startswith(("plan.", "hydra."))] + f["overrides"]))
    for w in p.warnings:
        console.print(f"[yellow]warning[/]: {w}")
    b = p.budget
    caps = [f"budget.{c.key}={b[c.key]:g}" for c in CAPS if b.get(c.key) is not None]
    if caps and b["fits"]:
        console.print(f"[green]fits the budget[/] ({', '.join(caps)})")
    for v in b["violations"]:
        console.print(f"[red]over budget[/]: {v['message']}")
    console.print(f"plan: {path}")


def plan_command(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    try:
        cmd = parse_args(args)
        schedule = load_schedule(cmd, planning=True)
        cfg = schedule.cfg
        plan = make_plan(schedule, recheck=lambda c: check_config(c, planning=True))
    except ConfigError as e:
        return exit_status(e)
    run_dir = _run_dir(cmd.overrides, cfg.schedule.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    write_json_atomic(path, redact_config(plan.to_dict()))  # like a run's config.json: secrets masked
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    config_dir = ["--config-dir", str(cmd.config_dir)] if cmd.config_dir else []
    print_plan(console, plan, path, config_dir + cmd.overrides)
    return 0 if plan.budget["fits"] else EXIT_OVER_BUDGET
