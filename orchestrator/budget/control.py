"""The run's budget while it trains: its ledger, the hard caps, warnings and the projection.

One `RunBudget` per run process. The stage loop asks `blocks` before each step (would the
step cross budget.max_tokens / max_flops / max_usd?), calls `count_step` after it (which adds
the step to the ledger and returns the `budget/*` metrics to log), and `stage_start` before a
stage's first step in this process. The budget prints a warning the first time spending
crosses each `budget.warn_at` fraction of a cap, and projects the schedule's cost from the
measured step time: when it will miss budget.max_usd, it says so early, by how much, and
where the run will stop.
"""
from __future__ import annotations

from rich.console import Console

from growth_ops.spec import active_parameters, count_parameters

from orchestrator.budget.caps import CAPS, USD, Cap
from orchestrator.budget.ledger import Ledger, Spend
from orchestrator.budget.planner import StageRates, stage_rates, stop_point
from orchestrator.schedule import ResolvedStage, Schedule


class RunBudget:
    def __init__(self, schedule: Schedule, console: Console, ledger: Ledger | None = None):
        cfg = schedule.cfg
        self.schedule, self.budget, self.cluster, self.console = schedule, cfg.budget, cfg.cluster, console
        self.names = schedule.names
        self.steps = [s.steps for s in schedule]
        self.rates: list[StageRates] = [stage_rates(cfg, s) for s in schedule]
        # planned seconds of a stage's average step (its steps may mix two contexts)
        self.planned_step_s = [r.over("step_seconds", 0, n) / n if n else r.step_seconds
                               for r, n in zip(self.rates, self.steps)]
        self.ledger = ledger or Ledger()
        self.warned: set[tuple[Cap, float]] = set()  # (cap, warn_at fraction) already said
        self.times: list[float] = []  # measured step seconds of the current stage, this process
        self.ratio: float | None = None  # measured / planned step time, last measured stage
        self.reported_over: tuple | None = None  # last announced (stop point, overrun USD)
        self.skipped_first = False
        self.started = False
        # Used for a stage's first step in a process, when no step has been timed yet, so a
        # run resumed at its dollar cap stops instead of taking one more step.
        self.expected_step_seconds = 0.0

    # -- the hard caps -----------------------------------------------------------------
    def blocks(self, stage: ResolvedStage, step: int, last_step_s: float) -> str | None:
        """The cap the next step of `stage` (its step `step`, from 0) would cross, or None."""
        b, total = self.budget, self.ledger.total
        seconds = last_step_s if last_step_s > 0 else self.expected_step_seconds
        if step > 0:  # a long-context step after a short one costs more
            seconds *= stage.flops_at(step) / stage.flops_at(step - 1)
        if b.max_tokens is not None and total.tokens + stage.tokens_at(step) > b.max_tokens:
            return f"budget.max_tokens={b.max_tokens}"
        if b.max_flops is not None and total.flops + stage.flops_at(step) > b.max_flops:
            return f"budget.max_flops={b.max_flops:.4g}"
        step_usd = seconds * stage.world / 3600.0 * self.cluster.usd_per_gpu_hour
        if b.max_usd is not None and total.cost_usd + step_usd > b.max_usd:
            return f"budget.max_usd={b.max_usd}"
        return None

    # -- estimates -------------------------------------------------------------------
    def _step_estimate(self, index: int) -> float:
        """Seconds for one step of stage `index`: measured in this process, else the
        stage's last step in the ledger (a resume: the price a stop at the cap refused),
        else the plan scaled by what earlier stages measured (in this process, else in the
        ledger)."""
        if self.times:
            return sum(self.times) / len(self.times)
        spend = self.ledger.stages.get(self.names[index])
        if spend is not None and spend.steps:
            return spend.last_step_s or spend.wall_s / spend.steps
        return self.planned_step_s[index] * (self.ratio or self._ledger_ratio(index) or 1.0)

    def _ledger_ratio(self, index: int) -> float | None:
        """Measured / planned step time of the last earlier stage the ledger has steps of: a
        resume at a stage's first step has not timed one in this process."""
        for j in range(index - 1, -1, -1):
            spend = self.ledger.stages.get(self.names[j])
            if spend is not None and spend.steps and self.planned_step_s[j] > 0:
                return (spend.wall_s / spend.steps) / self.planned_step_s[j]
        return None

    def projection(self, index: int, step: int) -> dict:
        """Total cost of the whole schedule if the rest runs at the measured speed."""
        total = self.ledger.total
        per = self._step_estimate(index)
        planned = self.planned_step_s[index]
        ratio = per / planned if planned > 0 else 1.0
        left_s = [0.0] * len(self.steps)
        left_s[index] = (self.steps[index] - step) * per
        for j in range(index + 1, len(self.steps)):
            left_s[j] = self.steps[j] * self.planned_step_s[j] * ratio
        gpu_hours = sum(s * r.gpus / 3600.0 for s, r in zip(left_s, self.rates))
        stages = self.schedule.stages
        left_flops = stages[index].flops_between(step, self.steps[index]) + sum(
            stages[j].flops for j in range(index + 1, len(self.steps)))
        return {"usd": total.cost_usd + gpu_hours * self.cluster.usd_per_gpu_hour,
                "gpu_hours": total.gpu_hours + gpu_hours, "flops": total.flops + left_flops,
                "step_s": per, "planned_step_s": planned, "ratio": ratio}

    def _stop(self, cap: Cap, index: int, step: int, step_usd: list[float] | None = None):
        left = cap.limit(self.budget) - cap.spent(self.ledger.total)
        rates = self.rates
        if step_usd is not None:  # measured prices of a step at each stage's seq_len
            rates = [r.priced(u) for r, u in zip(rates, step_usd)]
        return stop_point(self.names, rates, self.steps, cap, left, (index, step))

    # -- the loop's calls --------------------------------------------------------------
    def stage_start(self, index: int, step: int) -> None:
        """Before a stage's first step in this process."""
        if self.times and index > 0:  # what the stage before measured, against its plan
            self.ratio = (sum(self.times) / len(self.times)) / max(self.planned_step_s[index - 1], 1e-12)
        self.times, self.skipped_first = [], False
        self.reported_over = None
        self.expected_step_seconds = self._step_estimate(index)
        if self.started:
            return
        self.started = True
        total = self.ledger.total
        for cap in CAPS:
            limit = cap.limit(self.budget)
            if limit is None:
                continue
            used = cap.spent(total)
            passed = [f for f in self.budget.warn_at if used >= f * limit]
            self.warned.update((cap, f) for f in passed)
            if passed:
                self.console.print(f"[yellow]budget[/]: {100 * used / limit:.0f}% of budget.{cap.key}="
                                   f"{cap.brief(limit)} already spent ({cap.brief(used)})")
            if cap is not USD:  # FLOPs and tokens are known in advance: say now where it stops
                where = self._stop(cap, index, step)
                if where:
                    self.console.print(f"[yellow]budget[/]: budget.{cap.key}={cap.brief(limit)} stops this "
                                       f"schedule in stage {where[0]} at step {where[1]} of "
                                       f"{self.steps[self.names.index(where[0])]}")

    def count_step(self, stage: ResolvedStage, step: int, seconds: float) -> dict:
        """Add a finished step (`step` of `stage`, counted from 1, `seconds` long) to the
        ledger; returns the budget metrics: spent, left, projected."""
        spend = self.ledger.stage(stage.name)
        spend.add(stage.tokens_at(step - 1), stage.flops_at(step - 1), seconds, stage.world,
                  self.cluster.usd_per_gpu_hour)
        spend.params, spend.active_params = count_parameters(stage.spec), active_parameters(stage.spec)
        if seconds > 0:
            if self.skipped_first:
                self.times.append(seconds)
            self.skipped_first = True  # a stage's first step in a process includes warm-up
        total = self.ledger.total
        metrics = {"budget/spent_usd": total.cost_usd, "budget/spent_gpu_hours": total.gpu_hours,
                   "budget/spent_flops": total.flops, "budget/spent_tokens": float(total.tokens)}
        b, price = self.budget, self.cluster.usd_per_gpu_hour
        if b.max_usd is not None:
            metrics["budget/left_usd"] = b.max_usd - total.cost_usd
            if price > 0:
                metrics["budget/left_gpu_hours"] = (b.max_usd - total.cost_usd) / price
        if b.max_flops is not None:
            metrics["budget/left_flops"] = b.max_flops - total.flops
        if b.max_tokens is not None:
            metrics["budget/left_tokens"] = float(b.max_tokens - total.tokens)
        if len(self.times) >= self.budget.project_after_steps:
            proj = self.projection(stage.index, step)
            metrics.update({"budget/projected_usd": proj["usd"], "budget/projected_gpu_hours": proj["gpu_hours"],
                            "budget/projected_flops": proj["flops"]})
            if b.max_usd is not None:
                metrics["budget/projected_over_usd"] = proj["usd"] - b.max_usd
                self._announce_projection(stage.index, step, proj)
        self._threshold_warnings(total)
        if self.times:
            self.expected_step_seconds = self.times[-1]
        return metrics

    def _threshold_warnings(self, total: Spend) -> None:
        for cap in CAPS:
            limit = cap.limit(self.budget)
            if limit is None:
                continue
            used = cap.spent(total)
            crossed = [f for f in sorted(self.budget.warn_at) if used >= f * limit and (cap, f) not in self.warned]
            if crossed:
                self.warned.update((cap, f) for f in crossed)
                self.console.print(f"[yellow]budget[/]: {100 * crossed[-1]:.0f}% of budget.{cap.key}="
                                   f"{cap.brief(limit)} spent ({cap.brief(used)}; "
                                   f"{cap.brief(limit - used)} left)")

    def _announce_projection(self, index: int, step: int, proj: dict) -> None:
        limit = self.budget.max_usd
        over = proj["usd"] - limit
        if over <= 0:
            if self.reported_over is not None:
                self.console.print(f"[green]budget[/]: now projected to fit budget.max_usd="
                                   f"{USD.brief(limit)} (${proj['usd']:,.4g})")
                self.reported_over = None
            return
        price = self.cluster.usd_per_gpu_hour
        # a step at seq_len, at the measured speed (the measured average step of the current
        # stage, in proportion, where it mixes contexts)
        step_usd = [self.rates[j].step_seconds * proj["ratio"] * self.rates[j].gpus / 3600.0 * price
                    for j in range(len(self.rates))]
        where = self._stop(USD, index, step, step_usd)
        last = self.reported_over
        if last is not None and (where is None or last[0] is None or (where[0] == last[0][0] and abs(
                where[1] - last[0][1]) <= max(1, self.steps[self.names.index(where[0])] // 10))):
            return  # said already; speak again when the expected stop moves by a tenth of a stage
        self.reported_over = (where, over)
        at = f"; it will stop in stage {where[0]} around step {where[1]}" if where else ""
        self.console.print(
            f"[yellow]budget[/]: at the measured {proj['step_s']:.3g} s/step (plan {proj['planned_step_s']:.3g} s, "
            f"x{proj['ratio']:.2f}) the schedule will cost ${proj['usd']:,.4g}, ${over:,.4g} "
            f"({100 * over / limit:.0f}%) over budget.max_usd={USD.brief(limit)}{at}")
