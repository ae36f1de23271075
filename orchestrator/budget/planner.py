"""What a schedule will cost, before anything runs: pure arithmetic on the config.

Per stage: parameters (from the shape), trained tokens (whole steps, as the run rounds
them), FLOPs with the very `flops_per_token` the ledger uses (so plan and ledger agree),
the FLOPs the GPUs execute (more with activation recomputation), GPU-hours, days and
dollars on the configured cluster; the same for training the final model from scratch on
the schedule's total tokens; the saving; the budget check; and `fit_steps`, which scales
a schedule to a budget.

Time model: a stage executes `hw_flops` at `tflops_per_gpu` on each of its tp x pp x dp
GPUs. `tflops_per_gpu` is `cluster.achieved_tflops_per_gpu[stage name]` when measured
(FLM-101B published its own), else `peak_tflops_per_gpu x expected_mfu`. The rate is read
as executed FLOP/s, so recomputation costs time but is not model FLOPs (what MFU and the
ledger count).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

from growth_ops.spec import ModelSpec, active_parameters, attention_flops_per_token, count_parameters, flops_per_token

from orchestrator.budget.caps import CAPS, Cap
from orchestrator.budget.growth_curve import measured_saving, read_curve
from orchestrator.budget.loss_law import read_fit, schedule_prediction, stage_sizes
from orchestrator.budget.memory import GIB, memory_problem, state_bytes_per_param, step_memory
from orchestrator.budget.transition import transition_cost
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig, StageConfig
from orchestrator.schedule import (ResolvedStage, Schedule, long_steps, max_seq_len, resolve,
                                   tokens_of_steps)
from orchestrator.schedule.layout import check_parallel_layout

Recheck = Callable[[RunConfig], Schedule]  # a changed config -> its checked schedule


def executed_flops_per_token(spec: ModelSpec, seq_len: int, recompute: str) -> float:
    """Training FLOPs the hardware executes per token. Full recomputation repeats the forward
    pass (2N + 4 L q T more: x4/3); selective (Megatron) repeats only the attention core."""
    model = flops_per_token(spec, seq_len)
    if recompute == "full":
        return model * 4.0 / 3.0
    if recompute == "selective":
        return model + attention_flops_per_token(spec, seq_len) / 3.0
    return model


@dataclass
class StageRates:
    """One optimizer step of a stage at its `seq_len`, planned; `long`: the same for a step
    at `long_seq_len` when the stage mixes contexts (which steps are long: `long_steps`)."""

    step_tokens: int
    step_flops: float  # model FLOPs (the ledger's)
    step_hw_flops: float  # executed, with recomputation
    gpus: int
    tflops_per_gpu: float
    throughput: str  # measured | mfu
    step_seconds: float
    step_gpu_hours: float
    step_usd: float
    long: "StageRates | None" = None
    stage: StageConfig | None = None  # whose `long_fraction` places the long steps

    def over(self, field: str, start: int, end: int) -> float:
        """`field` (step_tokens, step_flops, step_seconds, ...) summed over steps [start, end)."""
        total = (end - start) * getattr(self, field)
        if self.long is not None:
            long = long_steps(self.stage, end) - long_steps(self.stage, start)
            total += long * (getattr(self.long, field) - getattr(self, field))
        return total

    def priced(self, step_usd: float) -> "StageRates":
        """These rates at another price of a step at seq_len (long steps in proportion)."""
        long = self.long
        if long is not None:
            long = dataclasses.replace(long, step_usd=step_usd * long.step_seconds / self.step_seconds
                                       if self.step_seconds > 0 else long.step_usd)
        return dataclasses.replace(self, step_usd=step_usd, long=long)


def _step_rates(cfg: RunConfig, stage: ResolvedStage, seq_len: int) -> StageRates:
    c = cfg.cluster
    tokens, gpus = stage.config.batch_size * seq_len, stage.world
    flops = flops_per_token(stage.spec, seq_len) * tokens
    hw = executed_flops_per_token(stage.spec, seq_len, cfg.plan.recompute) * tokens
    measured = c.achieved_tflops_per_gpu.get(stage.name)
    tflops = measured if measured is not None else c.peak_tflops_per_gpu * c.expected_mfu
    seconds = hw / (gpus * tflops * 1e12)
    gpu_hours = seconds * gpus / 3600.0
    return StageRates(tokens, flops, hw, gpus, tflops, "measured" if measured is not None else "mfu",
                      seconds, gpu_hours, gpu_hours * c.usd_per_gpu_hour)


def stage_rates(cfg: RunConfig, stage: ResolvedStage) -> StageRates:
    rates = _step_rates(cfg, stage, stage.config.seq_len)
    if stage.config.long_fraction > 0:
        rates.long, rates.stage = _step_rates(cfg, stage, stage.config.long_seq_len), stage.config
    return rates


@dataclass
class StagePlan:
    name: str
    params: int
    shape: dict
    tokens: int
    steps: int
    batch_size: int
    seq_len: int
    long_seq_len: int | None  # the long context of a stage that mixes two
    long_steps: int  # steps at long_seq_len
    layout: dict
    gpus: int
    nodes: int  # gpus over cluster.gpus_per_node (1 when that is not set)
    flops: float
    hw_flops: float
    tflops_per_gpu: float
    throughput: str
    gpu_hours: float
    days: float
    usd: float
    state_gib_per_gpu: float
    # from plan.loss_fit (grow predict): the loss at the end of the stage, its 95% interval
    predicted_loss: float | None = None
    predicted_interval: tuple[float, float] | None = None
    transition: dict | None = None  # the growth into this stage (budget/transition.py)
    # what a token computes with (a mixture of experts: top_k experts); FLOPs count these,
    # memory counts `params` (every expert)
    active_params: int | None = None
    experts: int = 0  # 0: a dense FFN


@dataclass
class Plan:
    schedule: str
    cluster: str
    recompute: str
    vocab: int
    stages: list[StagePlan]
    totals: dict
    scratch: dict
    saving_pct: float  # of cost (GPU-hours, hence dollars) against training from scratch
    saving_pct_flops: float
    budget: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fit: dict | None = None
    loss_fit: str | None = None
    measured: dict | None = None  # the growth curve's flops_frac at the plan's tokens per parameter
    loss_fit_note: str | None = None  # why no loss is predicted (a fit that is not a law), or how

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _predict_losses(path: str, schedule: Schedule, stages: list[StagePlan]) -> str:
    """Each stage's predicted loss and interval from a fit that is a law; the note the plan
    prints (why there is none, or what the column means)."""
    fit = read_fit(path)
    if not fit["lawful"]:
        return f"no predicted loss: {path} is not a law ({fit['verdict']})"
    for plan_stage, p in zip(stages, schedule_prediction(fit, stage_sizes(schedule))):
        plan_stage.predicted_loss, plan_stage.predicted_interval = p["predicted_loss"], (p["lo"], p["hi"])
    if fit.get("tokens") is not None:
        return (f"pred. loss [95% interval]: final validation loss predicted by {path} (grow predict) for the "
                f"stage's shape, at the proxies' {fit['tokens']:,} tokens (a fixed-token law)")
    return (f"pred. loss [95% interval]: validation loss at the end of each stage predicted by {path} (grow "
            "predict) from its size and the tokens it carries (a grown stage: those the law says it inherits)")


def nodes_for(cfg: RunConfig, gpus: int) -> int:
    """Nodes a layout of `gpus` GPUs spans on the cluster."""
    per_node = cfg.cluster.gpus_per_node
    return -(-gpus // per_node) if per_node else 1


def _stage_plan(cfg: RunConfig, stage: ResolvedStage) -> StagePlan:
    r, spec, lay, steps = stage_rates(cfg, stage), stage.spec, stage.layout, stage.steps
    mp = lay.tp * lay.pp
    return StagePlan(
        name=stage.name, params=count_parameters(spec),
        shape={"layers": spec.layers, "hidden": spec.hidden, "ffn": spec.ffn, "heads": spec.heads,
               "kv_heads": spec.kv_heads},
        tokens=stage.tokens, steps=steps, batch_size=stage.config.batch_size, seq_len=stage.config.seq_len,
        long_seq_len=stage.config.long_seq_len if r.long else None,
        long_steps=long_steps(stage.config, steps),
        layout={"tp": lay.tp, "pp": lay.pp, "dp": lay.dp}, gpus=r.gpus, nodes=nodes_for(cfg, r.gpus),
        flops=stage.flops, hw_flops=r.over("step_hw_flops", 0, steps), tflops_per_gpu=r.tflops_per_gpu,
        throughput=r.throughput, gpu_hours=r.over("step_gpu_hours", 0, steps),
        days=r.over("step_seconds", 0, steps) / 86400, usd=r.over("step_usd", 0, steps),
        state_gib_per_gpu=count_parameters(spec) / mp * state_bytes_per_param(cfg.engine.dtype, lay.dp) / GIB,
        active_params=active_parameters(spec), experts=spec.experts)


def _sum(stages: list[StagePlan]) -> dict:
    return {"tokens": sum(s.tokens for s in stages), "flops": sum(s.flops for s in stages),
            "hw_flops": sum(s.hw_flops for s in stages), "gpu_hours": sum(s.gpu_hours for s in stages),
            "days": sum(s.days for s in stages), "usd": sum(s.usd for s in stages)}


def _scratch(cfg: RunConfig, final: ResolvedStage, tokens: int) -> dict:
    """The final model trained from scratch on the schedule's tokens, with the final stage's
    context (or its mixture of contexts, per token as over the stage), layout and throughput."""
    r, n = stage_rates(cfg, final), final.steps
    per_token = tokens / r.over("step_tokens", 0, n)  # the stage's steps, scaled to `tokens`
    return {"params": count_parameters(final.spec), "active_params": active_parameters(final.spec), "tokens": tokens, "seq_len": final.config.seq_len,
            "layout": {"tp": final.layout.tp, "pp": final.layout.pp, "dp": final.layout.dp},
            "gpus": r.gpus, "nodes": nodes_for(cfg, r.gpus),
            **{key: per_token * r.over(field, 0, n) for key, field in (
                ("flops", "step_flops"), ("hw_flops", "step_hw_flops"), ("gpu_hours", "step_gpu_hours"),
                ("usd", "step_usd"))},
            "days": per_token * r.over("step_seconds", 0, n) / 86400}


def _saving(plan_value: float, scratch_value: float) -> float:
    return 100.0 * (1.0 - plan_value / scratch_value) if scratch_value > 0 else 0.0


# -- layouts against the cluster ---------------------------------------------------------

def check_layouts(schedule: Schedule) -> list[str]:
    """Raise ConfigError for a layout that cannot run on the cluster (a cluster runs parallel
    layouts, whatever engine.name says for a local test); return warnings for ones that run
    badly."""
    cfg = schedule.cfg
    c, warnings = cfg.cluster, []
    for i, rs in enumerate(schedule):
        key, lay, stage, spec, gpus = f"schedule.stages.{i}.layout", rs.layout, rs.config, rs.spec, rs.world
        if gpus > c.gpus:
            raise ConfigError(key, f"tp x pp x dp = {lay.tp} x {lay.pp} x {lay.dp} = {gpus} GPUs, "
                                   f"but cluster.gpus={c.gpus}")
        check_parallel_layout(cfg, i)
        if c.gpu_memory_gb is not None:
            need = step_memory(spec, lay, stage.batch_size, max_seq_len(stage), cfg.engine.dtype)
            problem = memory_problem(f"schedule.stages.{i}", need, c.gpu_memory_gb * GIB,
                                     f"cluster.gpu_memory_gb={c.gpu_memory_gb:g}",
                                     f"{cfg.engine.dtype}, optimizer sharded over dp={lay.dp}")
            if problem:
                raise ConfigError(*problem)
        if c.gpus_per_node is not None and lay.tp > c.gpus_per_node:
            warnings.append(f"{stage.name}: tp={lay.tp} spans nodes (cluster.gpus_per_node="
                            f"{c.gpus_per_node}); tensor parallelism across nodes is slow")
        if lay.pp > 1:
            micro = lay.micro_batch_size or stage.batch_size // lay.dp
            if (stage.batch_size // lay.dp) // micro < lay.pp:
                warnings.append(f"{stage.name}: {(stage.batch_size // lay.dp) // micro} micro-batches "
                                f"per step for pp={lay.pp}; the pipeline bubble dominates")
        if gpus < c.gpus:
            warnings.append(f"{stage.name}: uses {gpus} of the cluster's {c.gpus} GPUs; "
                            "the plan bills the GPUs the layout uses")
    return warnings


# -- budget ------------------------------------------------------------------------------

def _affordable(r: StageRates, cap: Cap, start: int, todo: int, left: float) -> int:
    """The most of the `todo` steps from `start` that `left` of a cap pays for."""
    lo, hi, slack = 0, todo, 1e-9 * cap.per_step(r)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if r.over(cap.step_field, start, start + mid) <= left + slack:
            lo = mid
        else:
            hi = mid - 1
    return lo


def stop_point(names: list[str], rates: list[StageRates], steps: list[int], cap: Cap,
               left: float, start: tuple[int, int] = (0, 0)) -> tuple[str, int] | None:
    """Where a run from (stage index, step) stops under `left` of a cap, or None if it
    finishes. The guard refuses the step that would cross the cap."""
    first, step0 = start
    for i in range(first, len(steps)):
        begin = step0 if i == first else 0
        todo = steps[i] - begin
        if cap.per_step(rates[i]) <= 0:
            continue
        affordable = _affordable(rates[i], cap, begin, todo, left)
        if affordable < todo:
            return names[i], begin + affordable
        left -= rates[i].over(cap.step_field, begin, steps[i])
    return None


def budget_check(cfg: RunConfig, plan: Plan, rates: list[StageRates]) -> dict:
    b = cfg.budget
    out: dict = {**{cap.key: cap.limit(b) for cap in CAPS}, "fits": True, "violations": []}
    names, steps = [s.name for s in plan.stages], [s.steps for s in plan.stages]
    for cap in CAPS:
        limit = cap.limit(b)
        if limit is None:
            continue
        planned = plan.totals[cap.name]
        if planned <= limit:
            continue
        where = stop_point(names, rates, steps, cap, limit)
        stop = f"; the run would stop in stage {where[0]} at step {where[1]}" if where else ""
        out["fits"] = False
        out["violations"].append({
            "key": f"budget.{cap.key}", "limit": limit, "planned": planned,
            "over_pct": 100.0 * (planned / limit - 1.0),
            "stop": {"stage": where[0], "step": where[1]} if where else None,
            "message": f"budget.{cap.key}: the plan needs {cap.exact(planned)}, {100 * (planned / limit - 1):.1f}% "
                       f"over the cap of {cap.exact(limit)}{stop}"})
    return out


# -- fitting a schedule to a budget ------------------------------------------------------

def min_useful_steps(schedule: Schedule, index: int) -> int:
    """The fewest steps that make a stage worth running: past its warmup and, after a growth,
    past the mask ramp (the validator's rule: ramp_steps < steps)."""
    stage = schedule[index]
    least = max(1, stage.config.lr.warmup_steps)
    if index > 0 and stage.spec != schedule[index - 1].spec:
        least = max(least, (stage.growth.ramp_steps or 0) + 1)
    return least


def fit_steps(schedule: Schedule, rates: list[StageRates]) -> tuple[list[int], dict]:
    """Rule `proportional`: every stage's steps x the same factor, the largest that keeps
    each set cap (rounded down to whole steps, then trimmed from the stage furthest above
    the factor). Refuses a budget below the smallest useful schedule: the same proportions
    scaled until the binding stage reaches `min_useful_steps`."""
    cfg = schedule.cfg
    b, stages = cfg.budget, schedule.stages
    steps = [s.steps for s in stages]
    caps = {cap: cap.limit(b) for cap in CAPS if cap.limit(b) is not None}
    if not caps:
        raise ConfigError("plan.fit", "needs a budget to fit; set budget.max_usd, budget.max_flops "
                                      "or budget.max_tokens")
    binding = {cap: v for cap, v in caps.items() if any(cap.per_step(r) > 0 for r in rates)}
    if not binding:
        raise ConfigError("budget.max_usd", "cannot bind: cluster.usd_per_gpu_hour is 0, so nothing costs money")

    def total(cap: Cap, st: list[int]) -> float:
        return sum(r.over(cap.step_field, 0, n) for n, r in zip(st, rates))

    least = [min_useful_steps(schedule, i) for i in range(len(stages))]
    f_min = max(m / n for m, n in zip(least, steps))
    smallest = [max(m, math.ceil(f_min * n - 1e-9)) for m, n in zip(least, steps)]
    for cap, limit in binding.items():
        need = total(cap, smallest)
        if need > limit:
            raise ConfigError(f"budget.{cap.key}", f"{cap.exact(limit)} cannot pay for the smallest useful "
                                               f"schedule ({', '.join(f'{s.name}: {n} steps' for s, n in zip(stages, smallest))}"
                                               f"; each stage past its warmup and growth ramp, in the "
                                               f"schedule's proportions), which needs {cap.exact(need)}; "
                                               f"allowed: >= {cap.exact(need)}")
    factor = min(limit / total(cap, steps) for cap, limit in binding.items())
    fitted = [max(m, math.floor(factor * n + 1e-9)) for m, n in zip(smallest, steps)]
    while any(total(cap, fitted) > limit for cap, limit in binding.items()):
        over = [(fitted[i] / steps[i], i) for i in range(len(steps)) if fitted[i] > smallest[i]]
        fitted[max(over)[1]] -= 1  # terminates: `smallest` fits every cap
    info = {"rule": cfg.plan.fit_rule, "factor": factor, "original_steps": steps, "steps": fitted,
            "min_steps": smallest, "min": {cap.key: total(cap, smallest) for cap in binding}}
    return fitted, info


def with_steps(schedule: Schedule, steps: list[int], recheck: Recheck | None = None) -> Schedule:
    """The schedule whose stages train exactly `steps` steps, re-checked by `recheck` (the
    command's parse -> resolve -> check, passed in from above) or only resolved."""
    new = copy.deepcopy(schedule.cfg)
    for stage, n in zip(new.schedule.stages, steps):
        stage.tokens = tokens_of_steps(stage, n)
    return (recheck or resolve)(new)


# -- the plan ----------------------------------------------------------------------------

def make_plan(schedule: Schedule | RunConfig, recheck: Recheck | None = None) -> Plan:
    """The plan of a checked schedule (fitted to the budget when plan.fit is set; `recheck`
    checks the fitted one). A checked config is resolved here (benchmarks, tests)."""
    if isinstance(schedule, RunConfig):
        schedule = resolve(schedule)
    cfg = schedule.cfg
    warnings = check_layouts(schedule)
    rates = [stage_rates(cfg, s) for s in schedule]
    fit = None
    if cfg.plan.fit:
        steps, fit = fit_steps(schedule, rates)
        schedule = with_steps(schedule, steps, recheck)
        cfg = schedule.cfg
        fit["overrides"] = [f"schedule.stages.{i}.tokens={s.tokens}" for i, s in enumerate(cfg.schedule.stages)]
    stages = [_stage_plan(cfg, s) for s in schedule]
    loss_fit_note = None
    if cfg.plan.loss_fit is not None:
        loss_fit_note = _predict_losses(cfg.plan.loss_fit, schedule, stages)
    for i in range(1, len(stages)):
        prev = schedule[i - 1].spec
        if dataclasses.replace(schedule[i].spec, **prev.rope_scaling()) != prev:  # a growth, not a RoPE switch
            stages[i].transition = transition_cost(cfg, schedule[i - 1], schedule[i])
    totals = _sum(stages)
    scratch = _scratch(cfg, schedule[-1], totals["tokens"])
    plan = Plan(schedule=cfg.schedule.name, cluster=cfg.cluster.name, recompute=cfg.plan.recompute,
                vocab=schedule.vocab, stages=stages, totals=totals, scratch=scratch,
                saving_pct=_saving(totals["gpu_hours"], scratch["gpu_hours"]),
                saving_pct_flops=_saving(totals["flops"], scratch["flops"]), warnings=warnings, fit=fit,
                loss_fit=cfg.plan.loss_fit, loss_fit_note=loss_fit_note)
    plan.budget = budget_check(cfg, plan, rates)
    saving = measured_saving(totals["tokens"] / scratch["params"], read_curve())
    plan.measured = saving.to_dict() if saving else None
    return plan
