"""A stage's start from the state of the stage before: growth (checked to keep the
function) and RoPE switches (reported), bounded per rank by its own slice of the state."""
from __future__ import annotations

import dataclasses
import gc
import shutil
import time

import torch

from growth_ops import ModelSpec, get_operator
from growth_ops.spec import ARCHITECTURE, PARAMETRIZATION

from orchestrator.checkpoint.canonical import checkpoint_dir, open_tensors
from orchestrator.checkpoint.grown import write_grown_shares
from orchestrator.config.validate import ConfigError
from orchestrator.faults import failpoint
from orchestrator.schedule import ResolvedStage


class GrowthCheckError(RuntimeError):
    pass


def start_stage(run, stage: ResolvedStage, weights, moments, old_spec: ModelSpec, opt_step: int,
                source: str, old_engine=None):
    """The engine for `stage`, from a model state of shape `old_spec` (and its Adam
    moments, if `opt_step` > 0), grown when the stage's shape differs. Returns the engine,
    the growth record and the staging dir of the grown, unsealed step-0 checkpoint (None
    without growth). A preserving operator must keep the validation loss, measured before
    growth by `old_engine` if given (it holds `weights`, masks done) or by a new one.
    Growth runs at the old RoPE scaling; a stage that changes it (`schedule.stages.N.position`)
    switches after, and the loss change of the switch is reported, not checked."""
    new_spec = stage.spec
    grown_spec = dataclasses.replace(new_spec, **old_spec.rope_scaling())  # the new shape, old positions
    if old_spec == new_spec:
        engine = run.engine(stage)
        engine.load(weights, moments, opt_step, None)
        return engine, None, None
    batches = run.val_batches(stage)
    grown = None
    if old_spec == grown_spec:  # only the positions change
        del old_engine
        engine, record = run.engine(stage), None
        engine.load(weights, moments, opt_step, None)
    else:
        engine, record, grown = _grow(run, stage, weights, moments, old_spec, opt_step, source, old_engine,
                                      batches)
    if grown_spec != new_spec:
        record = _switch_positions(run, stage, engine, old_spec, batches, source, record)
    return engine, record, grown


def _grow(run, stage: ResolvedStage, weights, moments, old_spec: ModelSpec, opt_step: int,
          source: str, old_engine, batches):
    """Grow the state into the stage's engine and check the function, at the old RoPE
    scaling; returns the engine, the growth record and the staging dir of the grown step-0
    checkpoint. The old engine goes before the new one is built (a parallel engine sets the
    process groups of its layout).

    No process holds more than its own slice of the grown state and a few tensors: the
    growth is written once, tensor by tensor from the old files, each writer rank growing
    the tensors it owns (`Engine.written_names`) into its shard; then every rank loads its
    slices from those files, as a resume does."""
    new_spec = dataclasses.replace(stage.spec, **old_spec.rope_scaling())
    started = time.time()
    growth = stage.growth
    op = get_operator(growth.operator)
    plan, masks = op.prepare(old_spec, new_spec, ramp_steps=growth.ramp_steps, layer_insert=growth.layer_insert,
                             init=growth.init, moments=growth.moments)
    if old_engine is None:
        old_engine = run.engine(dataclasses.replace(stage, spec=old_spec))
        old_engine.load(weights, None, 0, None)
    before = old_engine.evaluate(batches, exact=True)
    del old_engine
    gc.collect()  # DeepSpeed's engine keeps reference cycles: free the old model before the new one
    engine = run.engine(stage)  # this rank's slices of the new model, filled by load below
    role = engine.shard_role()
    generator = torch.Generator().manual_seed(run.cfg.seed * 1_000_003 + stage.index)
    grown = write_grown_shares(checkpoint_dir(run.run_dir, stage.index, stage.name, 0), role,
                               engine.written_names(), op=op, plan=plan, weights=weights,
                               moments=moments if opt_step else None, generator=generator)
    weights = moments = None
    grown_weights, grown_moments = open_tensors(grown)
    engine.load(grown_weights, grown_moments if opt_step else None, opt_step, masks)
    engine.set_rope_scaling(new_spec)  # the check runs at the scaling the state was trained with
    after = engine.evaluate(batches, exact=True)
    failpoint("growth.done")
    run.console.print(f"[bold]grow[/] {source} -> {stage.name} with {growth.operator}: "
                      f"val loss {before:.6f} -> {after:.6f} (|diff| {abs(after - before):.2e})")
    # the local engine checks in fp32 even when it trains in bf16; deepspeed bf16 cannot
    tolerance = growth.tolerance if engine.check_dtype == "fp32" else growth.tolerance_bf16
    if op.preserves_function and not abs(after - before) <= tolerance:  # a NaN fails too
        if role is None or role.leader:
            shutil.rmtree(grown, ignore_errors=True)  # never published
        raise GrowthCheckError(
            f"growth into stage {stage.name!r} with {growth.operator} changed the validation loss "
            f"from {before:.8f} to {after:.8f} (|diff| {abs(after - before):.2e} > tolerance "
            f"{tolerance:g} in {engine.check_dtype}); the operator did not preserve the function")
    return engine, {"operator": growth.operator, "val_loss_before": before, "val_loss_after": after,
                    "preserves_function": op.preserves_function, "check_dtype": engine.check_dtype,
                    "started_at": started, "seconds": round(time.time() - started, 3)}, grown


def _switch_positions(run, stage: ResolvedStage, engine, old_spec: ModelSpec, batches, source: str,
                      record: dict | None) -> dict:
    """Switch `engine` (holding the state, at the old RoPE scaling) to the stage's scaling.
    Neither a new theta nor interpolation preserves the function: like `stack`, the loss
    change is reported (on the console, in MLflow at the stage's step 0 and in summary.json)."""
    engine.set_rope_scaling(dataclasses.replace(stage.spec, **old_spec.rope_scaling()))
    before = engine.evaluate(batches, exact=True) if record is None else record["val_loss_after"]
    engine.set_rope_scaling(stage.spec)
    after = engine.evaluate(batches, exact=True)
    failpoint("positions.switched")
    old, new = old_spec.rope_scaling(), stage.spec.rope_scaling()
    run.console.print(f"[bold]positions[/] {source} -> {stage.name}: RoPE "
                      + ", ".join(f"{k} {old[k]:g} -> {new[k]:g}" for k in old if old[k] != new[k])
                      + f": val loss {before:.6f} -> {after:.6f} (not function-preserving; reported)")
    switch = {"from": old, "to": new, "val_loss_before": before, "val_loss_after": after}
    if record is None:  # no growth: the switch is the stage's transition
        return {"operator": None, "val_loss_before": before, "val_loss_after": after,
                "preserves_function": False, "check_dtype": engine.check_dtype, "positions": switch}
    return {**record, "positions": switch, "val_loss_after": after,
            "val_loss_after_growth": record["val_loss_after"]}


def check_same_model(spec: ModelSpec, want: ModelSpec, key: str) -> None:
    """A checkpoint's architecture and parametrization must be the run's (a muP checkpoint
    read as standard would compute another function)."""
    for field in ("vocab", "head_dim", *ARCHITECTURE, *PARAMETRIZATION):
        if getattr(spec, field) != getattr(want, field):
            raise ConfigError(key, f"the checkpoint's {field}={getattr(spec, field)!r} differs from "
                                   f"this run's {getattr(want, field)!r} (model.* and the tokenizer "
                                   "must match the checkpoint)")
