"""How the stage that runs next starts, for each answer of `state.next_stage`: from a fresh
initialisation or `init_from`, resumed from its own checkpoint, or grown from the finished
stage before it."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from growth_ops import ModelSpec

from orchestrator.checkpoint.canonical import CheckpointError
from orchestrator.checkpoint.checkpointer import OpenedCheckpoint
from orchestrator.checkpoint.init_model import model_at_start
from orchestrator.data import new_cursor
from orchestrator.engines.base import Engine
from orchestrator.model import build_model
from orchestrator.run.context import RunContext
from orchestrator.run.stage_loop import checkpoint_meta, save_state, set_rng_state
from orchestrator.run.state import NextStage, RunState
from orchestrator.run.transition import StageSource, check_same_model, start_stage


@dataclass
class ActiveStage:
    """The stage being trained: its engine, holding the state, and the run state."""

    engine: Engine
    state: RunState


def begin(ctx: RunContext, nxt: NextStage, ckpt: Path | None, meta: dict | None) -> ActiveStage:
    """The stage that runs next (`nxt`, decided from `ckpt`, the newest intact checkpoint,
    and its `meta`)."""
    if nxt.action == "fresh":
        return fresh_start(ctx)
    if nxt.action == "grow":
        ctx.console.print(f"resuming after stage {meta['stage_name']} from {ckpt}")
        prev = RunState.from_meta(meta)
        return grow_into(ctx, nxt.index, prev, source_after(prev, ctx.checkpointer.open(ckpt)))
    ctx.console.print(f"resuming stage {meta['stage_name']} at step {meta['step']} from {ckpt}")
    return resume_stage(ctx, ckpt)


def source_after(prev: RunState, final: OpenedCheckpoint, engine: Engine | None = None) -> StageSource:
    """What the stage after `prev` starts from: `prev`'s final checkpoint, opened lazily (a
    growth reads it tensor by tensor), and the engine that trained it when this process did."""
    return StageSource(final.weights, final.moments, prev.spec, prev.optimizer_step, prev.stage_name, engine,
                       prev.next_check)


def grow_into(ctx: RunContext, index: int, prev: RunState, source: StageSource) -> ActiveStage:
    """Start stage `index` from the finished stage before it (`prev`, its state in `source`).
    The grown state is the stage's step-0 checkpoint: the growth happens once, even if the
    run dies right after."""
    stage = ctx.schedule[index]
    lr = stage.config.lr
    state = RunState(stage_index=index, stage_name=stage.name, steps_total=stage.steps, spec=stage.spec,
                     lr_peak=lr.peak if lr.peak is not None else prev.lr, data_cursor=prev.data_cursor,
                     ledger=prev.ledger, global_step_start=prev.global_step,
                     completed_stages=prev.completed_stages)
    ctx.budget.ledger = state.ledger
    start = start_stage(ctx, stage, source)
    engine, state.growth = start.engine, start.growth
    if start.staged is None:  # same shape: nothing grown, the engine writes its state
        save_state(ctx, engine, state)
        return ActiveStage(engine, state)
    state.optimizer_step = prev.optimizer_step
    sealing = time.perf_counter()
    meta = checkpoint_meta(ctx, engine, state)
    role = engine.shard_role()
    if role is None or role.leader:  # the files the engine loaded are what it would export now
        ctx.checkpointer.publish(start.staged, ctx.checkpointer.path(index, stage.name, 0), meta)
        ctx.tracker.flush(force=True)
    if role is not None:
        role.barrier()
    if state.growth is not None and state.growth.phases is not None:  # logged at the stage's step 0
        sealed = round(time.perf_counter() - sealing, 3)
        state.growth = dataclasses.replace(state.growth, phases={**state.growth.phases, "seal": sealed})
    return ActiveStage(engine, state)


def fresh_start(ctx: RunContext) -> ActiveStage:
    """Stage 1 from a fresh initialisation, or from `init_from` (an imported or earlier
    checkpoint), grown into stage 1's shape if it is smaller."""
    cfg, stage = ctx.cfg, ctx.schedule[0]
    state = RunState(stage_index=0, stage_name=stage.name, steps_total=stage.steps, spec=stage.spec,
                     lr_peak=stage.config.lr.peak, data_cursor=new_cursor(sorted(ctx.data.train)),
                     ledger=ctx.budget.ledger)
    if cfg.init_from is None:
        engine = ctx.engine(stage)
        engine.load(build_model(stage.spec, seed=cfg.seed).canonical_state(), None, 0, None)
        return ActiveStage(engine, state)
    init = ctx.checkpointer.open(Path(cfg.init_from).expanduser(), check=True)
    spec = ModelSpec.from_dict(init.meta["spec"])
    check_same_model(spec, model_at_start(ctx.schedule), "init_from")  # checked before; the file may have changed
    start = start_stage(ctx, stage, StageSource(init.weights, None, spec, 0, Path(cfg.init_from).name))
    engine, state.growth = start.engine, start.growth
    if start.staged is not None:  # loaded; the stage's first checkpoint is written by training
        role = engine.shard_role()
        if role is not None:
            role.barrier()
        if role is None or role.leader:
            ctx.checkpointer.discard(start.staged)
    state.masks = engine.masks
    return ActiveStage(engine, state)


def resume_stage(ctx: RunContext, ckpt: Path) -> ActiveStage:
    """A stage in flight, from its own checkpoint `ckpt` (verified by `Checkpointer.latest`)."""
    saved = ctx.checkpointer.open(ckpt)
    state = RunState.from_meta(saved.meta)
    stage = ctx.schedule[state.stage_index]
    if state.spec.rope_scaling() != stage.spec.rope_scaling():  # the config is pinned: a damaged meta
        raise CheckpointError(f"{ckpt}: RoPE scaling {state.spec.rope_scaling()} differs from stage "
                              f"{stage.name!r}'s {stage.spec.rope_scaling()}")
    engine = ctx.engine(stage)
    check_same_model(state.spec, stage.spec, "run_dir")
    engine.load(saved.weights, saved.moments, state.optimizer_step, state.masks)
    set_rng_state(state.rng)
    ctx.budget.ledger = state.ledger
    if state.saved_at:  # a restart (requeue, preemption, crash): time since the checkpoint is lost
        state.ledger.add_lost(state.stage_name, max(0.0, time.time() - state.saved_at))
    return ActiveStage(engine, state)
