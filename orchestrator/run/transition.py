"""A stage's start from the state of the stage before: growth (checked to keep the
function) and RoPE switches (reported), bounded per rank by its own slice of the state."""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from growth_ops import ModelSpec, get_operator
from growth_ops.spec import ARCHITECTURE, PARAMETRIZATION, moe_settings_only

from orchestrator.config.errors import ConfigError
from orchestrator.engines.base import Engine
from orchestrator.engines.host_memory import release_free_heap
from orchestrator.faults import failpoint
from orchestrator.run.context import RunContext
from orchestrator.run.growth_record import GrowthRecord, PositionSwitch
from orchestrator.run.state import RunState
from orchestrator.schedule import ResolvedStage


# Validation batches per source the growth check evaluates, before and after. A preserving
# growth keeps every token's logits up to rounding, so the loss of any batch moves by ~1e-7;
# a broken one (an index map, a mask, a slice in the wrong place) changes the logits of
# nearly every position, since each grown tensor is built by one rule for all its rows:
# one batch (batch_size x seq_len positions, every layer and head) shows it as well as four
# do, at a quarter of the cost of two forward passes of the grown model.
CHECK_BATCHES = 1


class GrowthCheckError(RuntimeError):
    pass


class PhaseClock:
    """Seconds of a transition's phases, in the order they ran (`lap` closes one)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._mark, 3)
        self._mark = now


def check_batches(ctx: RunContext, stage: ResolvedStage) -> list[torch.Tensor]:
    """The fixed batches a transition into `stage` is checked on: the first CHECK_BATCHES of
    each validation source, the same before and after."""
    return [b for v in ctx.val_sets(stage).values() for b in v.batches[:CHECK_BATCHES]]


def batches_digest(batches: list[torch.Tensor]) -> str:
    """Which batches a loss was taken on (their shapes and tokens)."""
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.contiguous().numpy().tobytes())
    return h.hexdigest()


def next_check(ctx: RunContext, state: RunState, engine: Engine) -> dict | None:
    """At the end of stage `state` (its `engine` still live, at its own RoPE scaling): when
    the next stage grows, the old model's loss on that growth check's batches, as the check
    computes it (fp32 only: elsewhere a layout change moves the loss by more than rounding).
    The final checkpoint keeps it, so the transition, in this job or the next, uses it and
    never rebuilds the old model to evaluate it again. A multi-rank engine takes only batches
    of its own stage's shape (its data-parallel split and micro-batches fit those); else the
    transition evaluates the old model on the new layout, as before."""
    if state.stage_index + 1 >= len(ctx.schedule) or engine.check_dtype != "fp32":
        return None
    stage, nxt = ctx.schedule[state.stage_index], ctx.schedule[state.stage_index + 1]
    if dataclasses.replace(nxt.spec, **state.spec.rope_scaling()) == state.spec:  # no growth
        return None
    shape = (nxt.config.batch_size, nxt.config.seq_len)
    if engine.shard_role() is not None and shape != (stage.config.batch_size, stage.config.seq_len):
        return None
    batches = check_batches(ctx, nxt)
    return {"stage": nxt.name, "val_loss": engine.evaluate(batches, exact=True), "check_dtype": engine.check_dtype,
            "batches": batches_digest(batches)}


def known_before(source: "StageSource", stage: ResolvedStage, batches: list[torch.Tensor]) -> float | None:
    """The old model's loss on `batches` if `source`'s stage recorded it at its end (`next_check`)
    for this stage and these very batches; None: evaluate it."""
    known = source.known_check
    if not isinstance(known, dict) or known.get("stage") != stage.name or known.get("check_dtype") != "fp32":
        return None
    if known.get("batches") != batches_digest(batches) or not isinstance(known.get("val_loss"), (int, float)):
        return None
    return float(known["val_loss"])


@dataclass
class StageSource:
    """The model state a stage starts from: weights of shape `spec` (a checkpoint's, opened
    lazily) and their Adam moments, used when `optimizer_step` > 0; `name` says where it
    comes from in messages. `engine`: the finished engine when this process just trained
    the state (it gives the 'before' loss, masks done), handed over once (`take_engine`) so
    it is freed as soon as the check has used it."""

    weights: object
    moments: dict | None
    spec: ModelSpec
    optimizer_step: int
    name: str
    engine: Engine | None = None
    known_check: dict | None = None  # the old model's check loss, taken at its stage's end (`next_check`)

    def take_engine(self) -> Engine | None:
        engine, self.engine = self.engine, None
        return engine


@dataclass(frozen=True)
class StageStart:
    """A stage's engine holding its starting state, the transition's record (None: same
    shape and positions) and the staging dir of the grown, unsealed step-0 checkpoint
    (None: nothing grown)."""

    engine: Engine
    growth: GrowthRecord | None = None
    staged: Path | None = None


def start_stage(ctx: RunContext, stage: ResolvedStage, source: StageSource) -> StageStart:
    """The engine for `stage`, from `source`, grown when the stage's shape differs. A
    preserving operator must keep the validation loss, measured before growth by the
    source's engine if given or by a new one. Growth runs at the old RoPE scaling; a stage
    that changes it (`schedule.stages.N.position`) switches after, and the loss change of
    the switch is reported, not checked."""
    old_spec, new_spec = source.spec, stage.spec
    grown_spec = dataclasses.replace(new_spec, **old_spec.rope_scaling())  # the new shape, old positions
    if old_spec == new_spec or moe_settings_only(old_spec, new_spec):  # the same weights
        return StageStart(_load_as_is(ctx, stage, source))
    batches = check_batches(ctx, stage)
    if old_spec == grown_spec:  # only the positions change
        start = StageStart(_load_as_is(ctx, stage, source))
    else:
        start = _grow(ctx, stage, source, batches)
    if grown_spec != new_spec:
        record = _switch_positions(ctx, stage, start.engine, old_spec, batches, source.name, start.growth)
        start = dataclasses.replace(start, growth=record)
    return start


def _load_as_is(ctx: RunContext, stage: ResolvedStage, source: StageSource) -> Engine:
    source.take_engine()  # gone before the new engine is built
    engine = ctx.engine(stage)
    engine.load(source.weights, source.moments, source.optimizer_step, None)
    return engine


def _grow(ctx: RunContext, stage: ResolvedStage, source: StageSource, batches) -> StageStart:
    """Grow the state into the stage's engine and check the function, at the old RoPE
    scaling. The old engine goes before the new one is built (a parallel engine sets the
    process groups of its layout).

    No process holds more than its own slice of the grown state and a few tensors: the
    growth is written once, tensor by tensor from the old files, each writer rank growing
    the tensors it owns (`Engine.written_names`) into its shard; then every rank loads its
    slices from those files, as a resume does. The seconds of each phase go into the record
    (`phases`): the old model's check, building the new engine, growing (the writers' own
    split: read, grow, write, hash, sync; the slowest writer's), loading, the new check."""
    old_spec, opt_step, checkpointer = source.spec, source.optimizer_step, ctx.checkpointer
    new_spec = dataclasses.replace(stage.spec, **old_spec.rope_scaling())
    started, clock = time.time(), PhaseClock()
    growth = stage.growth
    op = get_operator(growth.operator)
    plan, masks = op.prepare(old_spec, new_spec, ramp_steps=growth.ramp_steps, layer_insert=growth.layer_insert,
                             init=growth.init, moments=growth.moments, drop_ratio=growth.drop_ratio)
    clock.lap("plan")
    old_engine = source.take_engine()
    before = known_before(source, stage, batches)
    if before is None:
        if old_engine is None:
            old_engine = ctx.engine(dataclasses.replace(stage, spec=old_spec))
            old_engine.load(source.weights, None, 0, None)
        before = old_engine.evaluate(batches, exact=True)
    if old_engine is not None:
        del old_engine
        gc.collect()  # DeepSpeed's engine keeps reference cycles: free the old model before the new one
    clock.lap("old_check")
    engine = ctx.engine(stage)  # this rank's slices of the new model, filled by load below
    release_free_heap()  # what building it freed (Megatron's full-size init copies) is not kept
    role = engine.shard_role()
    clock.lap("build")
    generator = torch.Generator().manual_seed(ctx.cfg.seed * 1_000_003 + stage.index)
    staged = checkpointer.stage_grown(checkpointer.path(stage.index, stage.name, 0), role, engine.written_names(),
                                      op=op, plan=plan, weights=source.weights,
                                      moments=source.moments if opt_step else None, generator=generator)
    clock.lap("grow_write")
    writers = checkpointer.staged_seconds(staged) if role is None or role.leader else {}
    grown = checkpointer.open_staged(staged)
    engine.load(grown.weights, grown.moments if opt_step else None, opt_step, masks)
    release_free_heap()  # the slices read while loading: the stage trains without them
    clock.lap("load")
    engine.set_rope_scaling(new_spec)  # the check runs at the scaling the state was trained with
    after = engine.evaluate(batches, exact=True)
    clock.lap("new_check")
    failpoint("growth.done")
    ctx.console.print(f"[bold]grow[/] {source.name} -> {stage.name} with {growth.operator}: "
                      f"val loss {before:.6f} -> {after:.6f} (|diff| {abs(after - before):.2e})")
    # the local engine checks in fp32 even when it trains in bf16; deepspeed bf16 cannot
    tolerance = growth.tolerance if engine.check_dtype == "fp32" else growth.tolerance_bf16
    if op.preserves_function and not abs(after - before) <= tolerance:  # a NaN fails too
        if role is None or role.leader:
            checkpointer.discard(staged)  # never published
        raise GrowthCheckError(
            f"growth into stage {stage.name!r} with {growth.operator} changed the validation loss "
            f"from {before:.8f} to {after:.8f} (|diff| {abs(after - before):.2e} > tolerance "
            f"{tolerance:g} in {engine.check_dtype}); the operator did not preserve the function")
    record = GrowthRecord(operator=growth.operator, val_loss_before=before, val_loss_after=after,
                          preserves_function=op.preserves_function, check_dtype=engine.check_dtype,
                          started_at=started, seconds=round(time.time() - started, 3),
                          phases={**clock.seconds, **slowest_writer(writers)})
    return StageStart(engine, record, staged)


def slowest_writer(writers: dict[str, dict]) -> dict[str, float]:
    """Of the writers' seconds (reading, growing, writing, hashing, syncing their shares, in
    parallel), the largest of each, as `grow_write` lasts as long as the slowest writer."""
    keys = ("read", "grow", "write", "hash", "sync")
    return {f"writer_{k}": round(max(w.get(k, 0.0) for w in writers.values()), 3) for k in keys} if writers else {}


def _switch_positions(ctx: RunContext, stage: ResolvedStage, engine: Engine, old_spec: ModelSpec, batches,
                      source: str, record: GrowthRecord | None) -> GrowthRecord:
    """Switch `engine` (holding the state, at the old RoPE scaling) to the stage's scaling.
    Neither a new theta nor interpolation preserves the function: like `stack`, the loss
    change is reported (on the console, in MLflow at the stage's step 0 and in summary.json)."""
    engine.set_rope_scaling(dataclasses.replace(stage.spec, **old_spec.rope_scaling()))
    before = engine.evaluate(batches, exact=True) if record is None else record.val_loss_after
    engine.set_rope_scaling(stage.spec)
    after = engine.evaluate(batches, exact=True)
    failpoint("positions.switched")
    old, new = old_spec.rope_scaling(), stage.spec.rope_scaling()
    ctx.console.print(f"[bold]positions[/] {source} -> {stage.name}: RoPE "
                      + ", ".join(f"{k} {old[k]:g} -> {new[k]:g}" for k in old if old[k] != new[k])
                      + f": val loss {before:.6f} -> {after:.6f} (not function-preserving; reported)")
    switch = PositionSwitch(old, new, before, after)
    if record is None:  # no growth: the switch is the stage's transition
        return GrowthRecord(operator=None, val_loss_before=before, val_loss_after=after, preserves_function=False,
                            check_dtype=engine.check_dtype, positions=switch)
    return record.with_switch(switch)


def check_same_model(spec: ModelSpec, want: ModelSpec, key: str) -> None:
    """A checkpoint's architecture and parametrization must be the run's (a muP checkpoint
    read as standard would compute another function)."""
    for field in ("vocab", "head_dim", *ARCHITECTURE, *PARAMETRIZATION):
        if getattr(spec, field) != getattr(want, field):
            raise ConfigError(key, f"the checkpoint's {field}={getattr(spec, field)!r} differs from "
                                   f"this run's {getattr(want, field)!r} (model.* and the tokenizer "
                                   "must match the checkpoint)")
