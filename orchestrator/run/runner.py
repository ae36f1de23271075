"""Run a growth schedule: resume from the latest checkpoint, grow between stages (checking
the function is preserved), train each stage, and report."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from pathlib import Path

from rich.console import Console

from orchestrator.budget.control import RunBudget
from orchestrator.checkpoint.canonical import CheckpointError
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.config.schema import RunConfig
from orchestrator.config.errors import ConfigError
from orchestrator.data import prepare_data
from orchestrator.engines.registry import engine_kind
from orchestrator.faults import failpoint
from orchestrator.budget.loss_law import predicted_vs_actual, stage_sizes
from orchestrator.run.directory import checkpointed_before, pin_settings
from orchestrator.run.context import RunContext, ValidationSets
from orchestrator.run.growth_record import GrowthRecord
from orchestrator.run.lock import RunLock, first_rank
from orchestrator.run.stage_loop import SignalFlag, StageLoop, StopRequested, save_state
from orchestrator.run.stage_start import begin, grow_into, source_after
from orchestrator.run.state import NextStage, RunState, check_resumable, next_stage
from orchestrator.schedule import Schedule, max_seq_len, resolve
from orchestrator.tracking.mlflow_tracker import make_tracker
from orchestrator.tracking.report import MetricsLog, build_summary, plot_losses, print_table, write_summary
from orchestrator.tracking.routing import with_routing

def is_leader(cfg: RunConfig) -> bool:
    """Rank 0 of a multi-rank engine (or the only process) logs, tracks and reports."""
    return not engine_kind(cfg.engine.name).multi_rank or first_rank()


def open_run(cfg: RunConfig, console: Console, leader: bool, extra_params: dict | None = None,
             schedule: Schedule | None = None) -> RunContext:
    """What every stage of one run process shares, built once. Data is prepared and the
    vocabulary checked before anything is written to the run directory."""
    run_dir = Path(cfg.run_dir)
    engines = engine_kind(cfg.engine.name)
    data = prepare_data(cfg.data)
    tok = data.tokenizer.vocab_size
    # the command's resolved schedule (a rank resolves its own), for the tokenizer's real size
    schedule = (dataclasses.replace(schedule, cfg=cfg) if schedule else resolve(cfg)).for_tokenizer(tok)
    if schedule.vocab < tok:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is below the tokenizer's {tok}")
    short_val = check_contexts_fit(cfg, data)
    if leader:
        pin_settings(run_dir, cfg)
    budget = RunBudget(schedule, console)
    metrics = MetricsLog(run_dir / "metrics.jsonl" if leader else Path(os.devnull))
    tracker = make_tracker(cfg.tracking, run_dir, f"{cfg.schedule.name}:{run_dir.name}",
                           {**_flat_params(dataclasses.asdict(cfg)), **(extra_params or {})}, console)
    for warning in short_val if leader else ():
        console.print(f"[yellow]warning:[/] {warning}")
    return RunContext(cfg=cfg, schedule=schedule, run_dir=run_dir, data=data, engines=engines, budget=budget,
                      metrics=metrics, tracker=tracker, console=console,
                      checkpointer=Checkpointer(run_dir, cfg.checkpoint.keep, check_resumable), leader=leader,
                      validation=ValidationSets(data, cfg.train.eval_batches))


def check_contexts_fit(cfg: RunConfig, data) -> list[str]:
    """Every training sequence a stage reads must fit in its source's train split. Sequences
    are packed (documents joined with eos, windows cut across them), so a context may be
    longer than any document, but not than a whole split: such a window would wrap around
    and hold the split twice. Known only once the data is tokenized, so checked here, before
    anything is written. A validation split shorter than a sequence only gives warnings
    (returned): its batches repeat text, as they always have on a tiny corpus."""
    warnings = []
    for i, stage in enumerate(cfg.schedule.stages):
        key = f"schedule.stages.{i}.{'long_seq_len' if max_seq_len(stage) > stage.seq_len else 'seq_len'}"
        for name in sorted(stage.mixture or data.train):
            have = len(data.train[name])
            if stage.mixture.get(name, 1.0) > 0 and have < max_seq_len(stage) + 1:
                raise ConfigError(key, f"a sequence of {max_seq_len(stage)} tokens (+1 for the labels) is longer "
                                       f"than source {name!r}'s train split ({have} tokens); sequences are packed "
                                       "across documents, so a context can be at most a whole split: use a "
                                       "shorter context or more text")
            if len(data.val[name]) < stage.seq_len + 1:
                warnings.append(f"stage {stage.name}: validation sequences of {stage.seq_len} tokens are longer than "
                                f"source {name!r}'s validation split ({len(data.val[name])} tokens) and repeat it")
    return warnings


def _flat_params(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out.update(_flat_params(item, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def _only_stage(ctx: RunContext, nxt: NextStage) -> int | None:
    """`run.only_stage`: the index to stop after, or None. Raises ConfigError if the stages
    before it are not finished; returns -1 if that stage is already finished."""
    name = ctx.cfg.run.only_stage
    if name is None:
        return None
    only, names = ctx.schedule.index(name), ctx.schedule.names
    current = len(names) if nxt.done else nxt.index
    if only < current:
        return -1
    if only > current:
        done = names[current - 1] if current else "nothing"
        raise ConfigError("run.only_stage", f"stage {name!r} needs {names[only - 1]!r} finished first "
                                            f"(finished so far: {done}) in {ctx.run_dir}")
    return only


def run_schedule(cfg: RunConfig, console: Console | None = None, extra_params: dict | None = None,
                 schedule: Schedule | None = None) -> dict:
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: room for the table, no wrapping
            console = Console(width=120)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    leader = is_leader(cfg)
    if not leader:  # other ranks of a multi-rank engine: compute and write shards, never report
        console = Console(file=io.StringIO())
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False))
    with RunLock(run_dir) if leader else contextlib.nullcontext():
        ctx = open_run(cfg, console, leader, extra_params, schedule)
        try:
            summary = _run(ctx)
        except StopRequested as stop:
            console.print(f"[yellow]{stop}[/]; run the same command again to resume")
            ctx.tracker.finish("KILLED")
            raise
        except BaseException:
            ctx.tracker.finish("FAILED")
            raise
        finally:
            ctx.metrics.close()
    return summary


def _newest_checkpoint(ctx: RunContext) -> Path | None:
    """The newest intact checkpoint; refuses to start over where a run already spent."""
    damaged: list[str] = []
    ckpt = ctx.checkpointer.latest(damaged)
    for problem in damaged:
        ctx.console.print(f"[yellow]warning:[/] damaged checkpoint skipped: {problem}")
    if ckpt is None and (damaged or checkpointed_before(ctx.run_dir, ctx.cfg)) \
            and not ctx.cfg.checkpoint.allow_fresh_start:
        why = "damaged: " + "; ".join(damaged) if damaged \
            else "none left, but the run wrote some before (metrics.jsonl, summary.json)"
        raise CheckpointError(f"no intact checkpoint in {ctx.run_dir / 'checkpoints'} ({why}); refusing to "
                              "start from scratch and lose what was spent - restore a checkpoint from a copy, "
                              "or pass checkpoint.allow_fresh_start=true to do that")
    return ckpt


def _run(ctx: RunContext) -> dict:
    console, schedule = ctx.console, ctx.schedule
    ckpt = _newest_checkpoint(ctx)
    meta = ctx.checkpointer.read_meta(ckpt) if ckpt else None
    nxt = next_stage(meta, len(schedule))
    only = _only_stage(ctx, nxt)
    if only == -1:
        console.print(f"stage {ctx.cfg.run.only_stage} of {ctx.run_dir} already finished; nothing to do")
        ctx.tracker.finish("FINISHED")
        return {"status": "already finished"}
    if nxt.done:
        console.print(f"{ctx.run_dir} already finished; nothing to do")
        state = RunState.from_meta(meta)
        ctx.budget.ledger = state.ledger
        return _finish(ctx, state.completed_stages, "complete")
    active = begin(ctx, nxt, ckpt, meta)
    with SignalFlag() as signals:
        while True:
            state = active.state
            index, stage = state.stage_index, schedule[state.stage_index]
            loop = StageLoop(ctx, stage, active.engine, state)
            outcome = loop.train(signals)
            if outcome != "complete":
                path = save_state(ctx, active.engine, state)
                console.print(f"[yellow]stopped at the step boundary before {outcome} would be "
                              f"exceeded[/]; checkpoint {path}")
                entry = {**loop.summary_entry(), "checkpoint": str(path)}
                return _finish(ctx, state.completed_stages + [entry], f"stopped: {outcome}")
            entry = loop.summary_entry()
            entry["checkpoint"] = str(ctx.checkpointer.path(index, stage.name, state.step))
            state.completed_stages = state.completed_stages + [entry]
            final = save_state(ctx, active.engine, state, complete=True)
            failpoint("stage.complete")
            ctx.tracker.finish_stage(stage.name)
            console.print(f"[green]stage {stage.name} done[/]: val loss {state.val_loss:.4f}")
            if index + 1 == len(schedule):
                return _finish(ctx, state.completed_stages, "complete")
            if index == only:  # one stage per job: growth into the next happens in its own job
                return _finish(ctx, state.completed_stages, f"stopped: run.only_stage={stage.name} done")
            # grown from disk, tensor by tensor
            source = source_after(state, ctx.checkpointer.open(final), active.engine)
            active = loop = None  # `source` holds the only reference to the engine now
            active = grow_into(ctx, index + 1, state, source)


def _finish(ctx: RunContext, entries: list[dict], status: str) -> dict:
    if not ctx.leader:
        return {"status": status}
    for e in entries:  # a stage run created after the store came back has its id only now
        e["mlflow_run_id"] = ctx.tracker.run_id(e["name"]) or e.get("mlflow_run_id")
    summary = build_summary(entries, ctx.budget.ledger, ctx.tracker.written_info, status)
    with_routing(summary, MetricsLog.read(ctx.run_dir / "metrics.jsonl"))  # a mixture's load balance per stage
    growth_steps, step = [], 0
    for e in entries:
        growth = GrowthRecord.from_dict(e["growth"])
        if growth and growth.grew:  # not a RoPE switch alone
            growth_steps.append((step, e["name"]))
        step += e["steps"]
    if ctx.cfg.plan.loss_fit and status == "complete":  # predicted vs actual, into MLflow and the summary
        summary["loss_prediction"] = predicted_vs_actual(ctx.cfg.plan.loss_fit, stage_sizes(ctx.schedule),
                                                         entries[-1]["val_loss"])
        ctx.log(entries[-1]["name"], step, {f"predict/{k}": v for k, v in summary["loss_prediction"].items()
                                            if isinstance(v, float)})
    write_summary(ctx.run_dir, summary)
    plot = plot_losses(ctx.run_dir / "metrics.jsonl", ctx.run_dir / "loss.png", growth_steps)
    print_table(ctx.console, summary)
    for path in (ctx.run_dir / "config.json", ctx.run_dir / "summary.json", plot):
        ctx.tracker.artifact(path)
    ctx.tracker.finish("FINISHED")  # a budget stop is a clean end too; a resume reopens the runs
    ctx.console.print(f"summary: {ctx.run_dir / 'summary.json'}")
    return summary
