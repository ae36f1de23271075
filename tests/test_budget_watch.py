"""Budget control while running: metrics, threshold warnings, the early projection, the
guard's first-step estimate, and a real run that stops at a dollar cap and resumes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from orchestrator.budget.control import BudgetWatch
from orchestrator.checkpoint.canonical import latest_checkpoint, read_meta
from orchestrator.budget.ledger import BudgetGuard, Ledger
from orchestrator.commands.plan import compose_config
from orchestrator.budget.planner import make_plan
from orchestrator.schedule import resolve, stage_spec, stage_steps

from .conftest import fork_grow, read_summary


class FakeLoop:
    def __init__(self, ctx, index: int, step: int = 0):
        self.ctx, self.p, self.points = ctx, SimpleNamespace(index=index, step=step), []

    def _log_point(self, metrics: dict) -> None:
        self.points.append(metrics)


def make_ctx(*overrides: str):
    cfg = compose_config(["schedule=tiny", *overrides])
    specs = [stage_spec(cfg, s, resolve(cfg).vocab) for s in cfg.schedule.stages]
    return SimpleNamespace(cfg=cfg, specs=specs, ledger=Ledger(), guard=BudgetGuard(cfg.budget, cfg.cluster),
                           console=Console(record=True, width=250))


def simulate(ctx, slowdown: float, stop_after: int | None = None) -> list[FakeLoop]:
    """Steps that take `slowdown` x the planned time, through the hooks, as the stage loop calls them."""
    watch, loops, taken = BudgetWatch(ctx), [], 0
    ctx._budget_watch = watch
    for index, stage in enumerate(ctx.cfg.schedule.stages):
        loop = FakeLoop(ctx, index)
        loops.append(loop)
        watch.stage_start(loop)
        rates = watch.rates[index]
        for _ in range(stage_steps(stage)):
            seconds = rates.step_seconds * slowdown
            if ctx.guard.blocks(ctx.ledger.total, rates.step_tokens, rates.step_flops, seconds, 1):
                return loops
            ctx.ledger.stage(stage.name).add(rates.step_tokens, rates.step_flops, seconds, 1,
                                             ctx.cfg.cluster.usd_per_gpu_hour)
            loop.p.step += 1
            watch.after_step(loop, seconds)
            taken += 1
            if stop_after is not None and taken == stop_after:
                return loops
    return loops


def test_projection_warns_early_and_by_how_much():
    planned = make_plan(compose_config(["schedule=tiny"])).totals["usd"]
    ctx = make_ctx(f"budget.max_usd={planned * 1.5}")
    loops = simulate(ctx, slowdown=3.0, stop_after=8)  # 8 steps into the 32-step first stage
    out = ctx.console.export_text()
    assert "over budget.max_usd" in out and "(100%)" in out  # 3x the plan = 2x the cap
    assert "will stop in stage" in out
    last = loops[0].points[-1]
    assert last["budget/projected_usd"] == pytest.approx(3 * planned, rel=1e-6)
    assert last["budget/projected_over_usd"] == pytest.approx(1.5 * planned, rel=1e-6)
    assert last["budget/left_usd"] == pytest.approx(1.5 * planned - ctx.ledger.total.cost_usd)
    assert {"budget/spent_gpu_hours", "budget/spent_flops", "budget/left_gpu_hours"} <= set(last)
    assert out.count("over budget.max_usd") == 1  # said once, not every step


def test_threshold_warnings_once_each_and_the_cap_holds():
    planned = make_plan(compose_config(["schedule=tiny"])).totals["usd"]
    cap = planned * 0.6
    ctx = make_ctx(f"budget.max_usd={cap}", "budget.warn_at=[0.5,0.8]")
    simulate(ctx, slowdown=1.0)
    out = ctx.console.export_text()
    assert out.count("50% of budget.max_usd") == 1 and out.count("80% of budget.max_usd") == 1
    spent = ctx.ledger.total.cost_usd
    assert spent <= cap < planned  # stopped before crossing


def test_projection_quiet_when_the_plan_fits():
    planned = make_plan(compose_config(["schedule=tiny"])).totals["usd"]
    ctx = make_ctx(f"budget.max_usd={planned * 2}")
    simulate(ctx, slowdown=1.2)
    assert "over budget" not in ctx.console.export_text()


def test_token_cap_says_at_the_start_where_it_stops():
    cap = 16384 + 5 * 512 + 100
    ctx = make_ctx(f"budget.max_tokens={cap}")
    simulate(ctx, slowdown=1.0)
    out = ctx.console.export_text()
    assert "stops this schedule in stage s2 at step 5 of 32" in out
    assert ctx.ledger.total.tokens == 16384 + 5 * 512


def test_resumed_run_at_its_cap_takes_no_more_steps():
    """The guard has no step time before a process's first step; the watch gives it the
    ledger's average, so a resume at the cap stops instead of creeping one step per restart."""
    ctx = make_ctx("budget.max_usd=1.0", "cluster.usd_per_gpu_hour=3600")  # $1 per device-second
    ctx.ledger.stage("s1").add(512, 1e9, 0.5, 1, 3600)
    ctx.ledger.stage("s1").add(512, 1e9, 0.45, 1, 3600)  # $0.95 spent, steps cost ~$0.475
    watch = BudgetWatch(ctx)
    loop = FakeLoop(ctx, 0, step=2)
    watch.stage_start(loop)
    assert ctx.guard.expected_step_seconds == pytest.approx(0.475)
    assert ctx.guard.blocks(ctx.ledger.total, 512, 1e9, 0.0, 1) == "budget.max_usd=1.0"
    assert "95% of budget.max_usd" in ctx.console.export_text()  # thresholds already passed: one line


@pytest.mark.slow
def test_run_stops_at_a_dollar_cap_resumes_when_raised_and_matches_the_plan(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    price = ["cluster.usd_per_gpu_hour=100", "tracking=off", "budget.project_after_steps=2"]
    cap = 0.01  # a tiny step costs $0.0003-0.001 at $100/h: stops within the schedule
    proc = fork_grow(tmp_path, f"hydra.run.dir={run_dir}", f"budget.max_usd={cap}", *price, cache=data_cache)
    assert "stopped at the step boundary before budget.max_usd=0.01" in proc.stdout
    assert "50% of budget.max_usd" in proc.stdout
    s = read_summary(run_dir)
    assert s["status"] == "stopped: budget.max_usd=0.01"
    spent = [json.loads(line)["budget/spent_usd"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "budget/spent_usd" in line]
    step_costs = [b - a for a, b in zip([0.0] + spent, spent) if b > a]
    assert s["totals"]["cost_usd"] <= cap + max(step_costs)  # at most one step over
    meta = read_meta(latest_checkpoint(run_dir))
    done = sum(st["steps"] for st in s["stages"])
    assert meta["global_step"] == done
    # the same cap again: no step taken
    fork_grow(tmp_path, f"hydra.run.dir={run_dir}", f"budget.max_usd={cap}", *price, cache=data_cache)
    assert read_summary(run_dir)["totals"]["tokens"] == s["totals"]["tokens"]
    # raised: runs to the end, and the ledger's FLOPs are the plan's
    fork_grow(tmp_path, f"hydra.run.dir={run_dir}", "budget.max_usd=1000", *price, cache=data_cache)
    final = read_summary(run_dir)
    assert final["status"] == "complete" and final["totals"]["tokens"] == 3 * 16384
    plan = make_plan(compose_config(["schedule=tiny"]))
    assert final["totals"]["flops"] == pytest.approx(plan.totals["flops"], rel=0.01)
    assert [st["flops"] for st in final["stages"]] == pytest.approx([st.flops for st in plan.stages], rel=0.01)
