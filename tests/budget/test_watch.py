"""Budget control while running: metrics, threshold warnings, the early projection, the
guard's first-step estimate, and a real run that stops at a dollar cap and resumes."""
from __future__ import annotations

import json
import pytest
from rich.console import Console

from orchestrator.budget.control import RunBudget
from orchestrator.budget.ledger import Spend
from orchestrator.budget.planner import make_plan
from orchestrator.checkpoint.canonical import latest_checkpoint, read_meta
from orchestrator.commands.plan import compose_config
from orchestrator.schedule import resolve

from ..conftest import fork_grow, read_summary


def make_budget(*overrides: str) -> RunBudget:
    return RunBudget(resolve(compose_config(["schedule=tiny", *overrides])), Console(record=True, width=250))


def simulate(budget: RunBudget, slowdown: float, stop_after: int | None = None) -> list[list[dict]]:
    """Steps that take `slowdown` x the planned time, through the budget's calls as the
    stage loop makes them; returns the metrics it gave back, per stage."""
    points, taken = [], 0
    for stage in budget.schedule:
        points.append([])
        budget.stage_start(stage.index, 0)
        seconds = budget.rates[stage.index].step_seconds * slowdown
        for step in range(1, stage.steps + 1):
            if budget.blocks(stage, step - 1, seconds):
                return points
            points[-1].append(budget.count_step(stage, step, seconds))
            taken += 1
            if stop_after is not None and taken == stop_after:
                return points
    return points


def test_projection_warns_early_and_by_how_much():
    planned = make_plan(compose_config(["schedule=tiny"])).totals["usd"]
    budget = make_budget(f"budget.max_usd={planned * 1.5}")
    points = simulate(budget, slowdown=3.0, stop_after=8)  # 8 steps into the 32-step first stage
    out = budget.console.export_text()
    assert "over budget.max_usd" in out and "(100%)" in out  # 3x the plan = 2x the cap
    assert "will stop in stage" in out
    last = points[0][-1]
    assert last["budget/projected_usd"] == pytest.approx(3 * planned, rel=1e-6)
    assert last["budget/projected_over_usd"] == pytest.approx(1.5 * planned, rel=1e-6)
    assert last["budget/left_usd"] == pytest.approx(1.5 * planned - budget.ledger.total.cost_usd)
    assert {"budget/spent_gpu_hours", "budget/spent_flops", "budget/left_gpu_hours"} <= set(last)
    assert out.count("over budget.max_usd") == 1  # said once, not every step


def test_threshold_warnings_once_each_and_the_cap_holds():
    planned = make_plan(compose_config(["schedule=tiny"])).totals["usd"]
    cap = planned * 0.6
    budget = make_budget(f"budget.max_usd={cap}", "budget.warn_at=[0.5,0.8]")
    simulate(budget, slowdown=1.0)
    out = budget.console.export_text()
    assert out.count("50% of budget.max_usd") == 1 and out.count("80% of budget.max_usd") == 1
    spent = budget.ledger.total.cost_usd
    assert spent <= cap < planned  # stopped before crossing


def test_projection_quiet_when_the_plan_fits():
    planned = make_plan(compose_config(["schedule=tiny"])).totals["usd"]
    budget = make_budget(f"budget.max_usd={planned * 2}")
    simulate(budget, slowdown=1.2)
    assert "over budget" not in budget.console.export_text()


def test_token_cap_says_at_the_start_where_it_stops():
    cap = 16384 + 5 * 512 + 100
    budget = make_budget(f"budget.max_tokens={cap}")
    simulate(budget, slowdown=1.0)
    out = budget.console.export_text()
    assert "stops this schedule in stage s2 at step 5 of 32" in out
    assert budget.ledger.total.tokens == 16384 + 5 * 512


def test_blocks_before_crossing_each_cap():
    stage = make_budget().schedule[0]
    tokens, flops = stage.step_tokens, stage.step_flops

    def blocks(cap: str, seconds: float, **spent) -> str | None:
        budget = make_budget("cluster.usd_per_gpu_hour=3600", cap)  # $1 per device-second
        budget.ledger.stages["s1"] = Spend(**spent)
        return budget.blocks(stage, 0, seconds)

    assert blocks(f"budget.max_tokens={tokens + 90}", 0, tokens=90) is None
    assert blocks(f"budget.max_tokens={tokens + 89}", 0, tokens=90) == f"budget.max_tokens={tokens + 89}"
    assert blocks(f"budget.max_flops={flops + 89}", 0, flops=90.0).startswith("budget.max_flops")
    assert blocks(f"budget.max_flops={flops + 90}", 0, flops=90.0) is None
    assert blocks("budget.max_usd=10.0", 1.1, cost_usd=9.0) == "budget.max_usd=10.0"
    assert blocks("budget.max_usd=10.0", 1.0, cost_usd=9.0) is None


def test_resumed_run_at_its_cap_takes_no_more_steps():
    """No step is timed before a process's first step; the budget then prices it by the
    stage's last step in the ledger (what the stop priced the refused step by), so a resume
    at the cap stops instead of creeping one step per restart, even when that last step was
    slower than the stage's average."""
    budget = make_budget("budget.max_usd=1.0", "cluster.usd_per_gpu_hour=3600")  # $1 per device-second
    budget.ledger.stage("s1").add(512, 1e9, 0.05, 1, 3600)
    budget.ledger.stage("s1").add(512, 1e9, 0.05, 1, 3600)
    budget.ledger.stage("s1").add(512, 1e9, 0.85, 1, 3600)  # $0.95 spent; the average step $0.32
    stopped = budget.blocks(budget.schedule[0], 3, 0.85)
    assert stopped == "budget.max_usd=1.0"
    budget.stage_start(0, 3)
    assert budget.expected_step_seconds == pytest.approx(0.85)
    assert budget.blocks(budget.schedule[0], 3, 0.0) == stopped
    assert "95% of budget.max_usd" in budget.console.export_text()  # thresholds already passed: one line


def test_a_resume_at_a_stages_first_step_prices_it_by_what_earlier_stages_measured():
    """A run stopped by its cap right after a growth resumes at the new stage's step 0: no step
    of it is timed anywhere, so the plan is scaled by the earlier stage's measured speed (from
    the ledger), as the stopped run did, and the resume takes no step the stop refused."""
    budget = make_budget("budget.max_usd=1.0")
    for _ in range(32):  # s1 ran at 3x its planned step time
        budget.ledger.stage("s1").add(512, 1e9, 3 * budget.rates[0].step_seconds, 1, 0.0)
    budget.stage_start(1, 0)
    assert budget.expected_step_seconds == pytest.approx(3 * budget.rates[1].step_seconds)


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
