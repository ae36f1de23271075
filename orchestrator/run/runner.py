"""Run a growth schedule: resume from the latest checkpoint, grow between stages (checking
the function is preserved), train each stage, and report."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import re
import time
from pathlib import Path

import torch
from rich.console import Console

from growth_ops import MaskState, ModelSpec, get_operator

from orchestrator.checkpoint.canonical import (MOMENTS, CheckpointError, checkpoint_dir, latest_checkpoint, load_checkpoint,
                         open_checkpoint)
from orchestrator.config.schema import RunConfig
from orchestrator.data import new_cursor, prepare_data, validation_batches
from orchestrator.engines import make_engine
from orchestrator.faults import failpoint
from orchestrator.budget.ledger import BudgetGuard, Ledger
from orchestrator.model import build_model
from orchestrator.tracking.report import MetricsLog, build_summary, plot_losses, print_table, write_summary
from orchestrator.run.stage_loop import SignalFlag, StageLoop, StageProgress, StopRequested, set_rng_state
from orchestrator.tracking.mlflow_tracker import make_tracker
from orchestrator.config.validate import ConfigError
from orchestrator.schedule import effective_growth, stage_spec

# Config sections that define what a run computes; a resume must not change them.
FIXED_ON_RESUME = ("seed", "init_from", "model", "schedule", "growth", "data", "train")


class GrowthCheckError(RuntimeError):
    pass


class RunLock:
    """One `grow run` per run directory. flock is released by the kernel when the holder
    dies, so a killed run never leaves the directory stuck."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode().strip() or "?"
            os.close(self._fd)
            raise ConfigError("run_dir", f"{self.path.parent} is in use by another grow run "
                                         f"(pid {holder}); wait for it or pick another hydra.run.dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _set(tree, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def _check_same_run(run_dir: Path, cfg: RunConfig) -> None:
    path = run_dir / "config.json"
    current = {k: v for k, v in dataclasses.asdict(cfg).items() if k in FIXED_ON_RESUME}
    if not path.exists():
        path.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        return
    saved = {k: v for k, v in json.loads(path.read_text()).items() if k in FIXED_ON_RESUME}

    def diff(a, b, key=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                found = diff(a.get(k), b.get(k), f"{key}.{k}".lstrip("."))
                if found:
                    return found
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                found = diff(x, y, f"{key}.{i}")
                if found:
                    return found
        elif a != b:
            return key, a, b
        return None

    found = diff(saved, current)
    while found and re.fullmatch(r"schedule\.stages\.\d+\.layout(\..*)?", found[0]):
        # a layout may change on resume (e.g. fewer GPUs after a requeue): the canonical
        # checkpoint and the global data cursor do not depend on it
        _set(saved, found[0], found[2])
        found = diff(saved, current)
    if found:
        key, old, new = found
        raise ConfigError(key, f"differs from the run already in {run_dir} ({old!r} -> {new!r}); "
                               "resume with the same settings or use another hydra.run.dir")


class RunContext:
    """What every stage shares: config, data, tracking, ledger, console."""

    def __init__(self, cfg: RunConfig, console: Console, extra_params: dict | None = None):
        self.cfg, self.console = cfg, console
        self.run_dir = Path(cfg.run_dir)
        self.data = prepare_data(cfg.data)
        tok = self.data.tokenizer.vocab_size
        m = cfg.model
        self.vocab = m.vocab_size or -(-tok // m.vocab_multiple) * m.vocab_multiple
        if self.vocab < tok:
            raise ConfigError("model.vocab_size", f"{m.vocab_size} is below the tokenizer's {tok}")
        self.specs = [stage_spec(cfg, s, self.vocab) for s in cfg.schedule.stages]
        self.ledger = Ledger()
        self.guard = BudgetGuard(cfg.budget, cfg.cluster)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.tracker = make_tracker(cfg.tracking, self.run_dir, f"{cfg.schedule.name}:{self.run_dir.name}",
                                    {**_flat_params(dataclasses.asdict(cfg)), **(extra_params or {})}, console)
        self._val: dict = {}

    def val_batches(self, stage) -> list[torch.Tensor]:
        key = (stage.batch_size, stage.seq_len, tuple(sorted(stage.mixture or self.data.val)))
        if key not in self._val:
            streams = {n: self.data.val[n] for n in key[2]}
            self._val[key] = validation_batches(streams, stage.batch_size, stage.seq_len,
                                                self.cfg.train.eval_batches)
        return self._val[key]


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


def _grow_into(ctx: RunContext, index: int, prev_ckpt: Path, handoff: dict | None = None):
    """Start stage `index` from the previous stage's final checkpoint, or, when this process
    just wrote it, from `handoff`: {"written": what it wrote, "engine": the finished engine}
    (taken out of the dict, so the old engine is freed once it has served the check)."""
    stage = ctx.cfg.schedule.stages[index]
    old_engine = None
    if handoff is not None:
        (state, moments, meta), old_engine = handoff.pop("written"), handoff.pop("engine")
    else:
        state, moments, meta = _read_for_engine(ctx.cfg, prev_ckpt)  # growth below reads it all
    ctx.ledger = Ledger.from_dict(meta["ledger"])
    progress = StageProgress(index=index, step=0, global_step_start=meta["global_step"],
                             lr_peak=stage.lr.peak if stage.lr.peak is not None else meta["lr"],
                             cursor=meta["data_cursor"], growth=None,
                             completed=meta["completed_stages"])
    engine, progress.growth = _start_stage(ctx, index, state, moments, ModelSpec.from_dict(meta["spec"]),
                                           meta["optimizer_step"], meta["stage_name"], old_engine)
    return engine, progress


def _start_stage(ctx: RunContext, index: int, state, moments, old_spec: ModelSpec, opt_step: int,
                 source: str, old_engine=None):
    """The engine for stage `index`, from a model state of shape `old_spec` (and its Adam
    moments, if `opt_step` > 0), grown when the stage's shape differs. Returns the engine
    and the growth record; a preserving operator must keep the validation loss, measured
    before growth by `old_engine` if given (it holds `state`, masks done) or by a new one."""
    cfg, stage, new_spec = ctx.cfg, ctx.cfg.schedule.stages[index], ctx.specs[index]
    if old_spec == new_spec:
        engine = make_engine(cfg, stage, new_spec)
        engine.load(state, moments, opt_step, None)
        return engine, None
    growth = effective_growth(cfg, stage)
    op = get_operator(growth.operator)
    batches = ctx.val_batches(stage)
    if old_engine is None:
        old_engine = make_engine(cfg, stage, old_spec)
        old_engine.load(state, None, 0, None)
    before = old_engine.evaluate(batches, exact=True)
    del old_engine
    # growth maps whole tensors: every rank of the new layout grows the full state
    state = dict(state.items())
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    grown, masks, maps = op.grow(state, old_spec, new_spec, ramp_steps=growth.ramp_steps,
                                 layer_insert=growth.layer_insert, generator=generator,
                                 init=growth.init, moments=growth.moments)
    # masks is None for operators exact without masks (zero, clone) and for stack
    grown_moments = None
    if opt_step:
        grown_moments = {k: op.grow_moments(dict(moments[k].items()), old_spec, new_spec, maps, kind=k)
                         for k in MOMENTS}
    engine = make_engine(cfg, stage, new_spec)
    engine.load(grown, grown_moments, opt_step, masks)
    after = engine.evaluate(batches, exact=True)
    failpoint("growth.done")
    ctx.console.print(f"[bold]grow[/] {source} -> {stage.name} with {growth.operator}: "
                      f"val loss {before:.6f} -> {after:.6f} (|diff| {abs(after - before):.2e})")
    # the local engine checks in fp32 even when it trains in bf16; deepspeed bf16 cannot
    tolerance = growth.tolerance if engine.check_dtype == "fp32" else growth.tolerance_bf16
    if op.PRESERVES_FUNCTION and abs(after - before) > tolerance:
        raise GrowthCheckError(
            f"growth into stage {stage.name!r} with {growth.operator} changed the validation loss "
            f"from {before:.8f} to {after:.8f} (|diff| {abs(after - before):.2e} > tolerance "
            f"{tolerance:g} in {engine.check_dtype}); the operator did not preserve the function")
    return engine, {"operator": growth.operator, "val_loss_before": before, "val_loss_after": after,
                    "preserves_function": op.PRESERVES_FUNCTION, "check_dtype": engine.check_dtype}


def _fresh_start(ctx: RunContext):
    """Stage 1 from a fresh initialisation, or from `init_from` (an imported or earlier
    checkpoint), grown into stage 1's shape if it is smaller."""
    cfg, stage = ctx.cfg, ctx.cfg.schedule.stages[0]
    progress = StageProgress(index=0, step=0, global_step_start=0, lr_peak=stage.lr.peak,
                             cursor=new_cursor(sorted(ctx.data.train)), growth=None)
    if cfg.init_from is None:
        engine = make_engine(cfg, stage, ctx.specs[0])
        engine.load(build_model(ctx.specs[0], seed=cfg.seed).canonical_state(), None, 0, None)
        return engine, progress
    state, _, meta = load_checkpoint(Path(cfg.init_from).expanduser())
    spec = ModelSpec.from_dict(meta["spec"])
    target = ctx.specs[0]
    for field in ("vocab", "norm", "mlp", "position", "tie_embeddings", "rope_theta", "head_dim"):
        if getattr(spec, field) != getattr(target, field):
            raise ConfigError("init_from", f"the checkpoint's {field}={getattr(spec, field)!r} differs from "
                                           f"this run's {getattr(target, field)!r} (model.* and the tokenizer "
                                           "must match the checkpoint)")
    engine, progress.growth = _start_stage(ctx, 0, state, None, spec, 0, Path(cfg.init_from).name)
    return engine, progress


def _read_for_engine(cfg: RunConfig, ckpt: Path):
    """A multi-rank engine reads only its slices (lazily, checkpoint.LazyTensors); the local
    engine the whole checkpoint."""
    return open_checkpoint(ckpt) if cfg.engine.name == "deepspeed" else load_checkpoint(ckpt)


def _resume_stage(ctx: RunContext, ckpt: Path):
    state, moments, meta = _read_for_engine(ctx.cfg, ckpt)
    index = meta["stage_index"]
    stage = ctx.cfg.schedule.stages[index]
    engine = make_engine(ctx.cfg, stage, ctx.specs[index])
    engine.load(state, moments, meta["optimizer_step"], MaskState.from_dict(meta["masks"]))
    set_rng_state(meta["rng"])
    progress = StageProgress(index=index, step=meta["step"], global_step_start=meta["global_step"] - meta["step"],
                             lr_peak=meta["lr_peak"], cursor=meta["data_cursor"], growth=meta["growth"],
                             lr=meta["lr"], val_loss=meta["val_loss"], completed=meta["completed_stages"])
    ctx.ledger = Ledger.from_dict(meta["ledger"])
    if meta.get("saved_at"):  # a restart (requeue, preemption, crash): time since the checkpoint is lost
        ctx.ledger.add_lost(stage.name, max(0.0, time.time() - meta["saved_at"]))
    return engine, progress


def _only_stage(ctx: RunContext, meta: dict | None) -> int | None:
    """`run.only_stage`: the index to stop after, or None. Raises ConfigError if the stages
    before it are not finished; returns -1 if that stage is already finished."""
    name = ctx.cfg.run.only_stage
    if name is None:
        return None
    names = [s.name for s in ctx.cfg.schedule.stages]
    only = names.index(name)
    if meta is None:
        current = 0
    else:
        current = meta["stage_index"] + (1 if meta["stage_complete"] else 0)
    if only < current:
        return -1
    if only > current:
        done = names[current - 1] if current else "nothing"
        raise ConfigError("run.only_stage", f"stage {name!r} needs {names[only - 1]!r} finished first "
                                            f"(finished so far: {done}) in {ctx.run_dir}")
    return only


def is_leader(cfg: RunConfig) -> bool:
    """Rank 0 of a multi-rank engine (or the only process) logs, tracks and reports."""
    return cfg.engine.name == "local" or int(os.environ.get("RANK", "0")) == 0


def _mark_finished(ctx: RunContext, index: int) -> None:
    if not is_leader(ctx.cfg):
        return
    from orchestrator.atomic import write_json_atomic
    from orchestrator.slurm.paths import finished_flag
    flag = finished_flag(ctx.run_dir, index, ctx.cfg.schedule.stages[index].name)
    flag.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(flag, {"finished_at": time.time(), "job_id": os.environ.get("SLURM_JOB_ID")})


def run_schedule(cfg: RunConfig, console: Console | None = None, extra_params: dict | None = None) -> dict:
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
        if leader:
            _check_same_run(run_dir, cfg)
        ctx = RunContext(cfg, console, extra_params)
        if not leader:
            ctx.metrics.close()
            ctx.metrics = MetricsLog(Path(os.devnull))
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


def _run(ctx: RunContext) -> dict:
    cfg, console, stages = ctx.cfg, ctx.console, ctx.cfg.schedule.stages
    damaged: list[str] = []
    ckpt = latest_checkpoint(ctx.run_dir, damaged)
    for problem in damaged:
        console.print(f"[yellow]warning:[/] damaged checkpoint skipped: {problem}")
    if ckpt is None and damaged and not cfg.checkpoint.allow_fresh_start:
        raise CheckpointError(f"no intact checkpoint in {ctx.run_dir / 'checkpoints'} "
                              f"({len(damaged)} damaged); refusing to start from scratch - pass "
                              "checkpoint.allow_fresh_start=true to do that")
    meta = json.loads((ckpt / "meta.json").read_text()) if ckpt else None
    only = _only_stage(ctx, meta)
    if only == -1:
        console.print(f"stage {cfg.run.only_stage} of {ctx.run_dir} already finished; nothing to do")
        ctx.tracker.finish("FINISHED")
        return {"status": "already finished"}
    if meta is None:
        engine, progress = _fresh_start(ctx)
    elif meta["stage_complete"] and meta["stage_index"] + 1 < len(stages):
        console.print(f"resuming after stage {meta['stage_name']} from {ckpt}")
        engine, progress = _grow_into(ctx, meta["stage_index"] + 1, ckpt)
        _save_growth_checkpoint(ctx, engine, progress)
    elif meta["stage_complete"]:
        console.print(f"{ctx.run_dir} already finished; nothing to do")
        ctx.ledger = Ledger.from_dict(meta["ledger"])
        return _finish(ctx, meta["completed_stages"], "complete")
    else:
        console.print(f"resuming stage {meta['stage_name']} at step {meta['step']} from {ckpt}")
        engine, progress = _resume_stage(ctx, ckpt)

    with SignalFlag() as signals:
        while True:
            index = progress.index
            loop = StageLoop(ctx, stages[index], ctx.specs[index], engine, progress)
            if progress.step == 0 and progress.growth:
                loop._log_point({"growth/val_loss_before": progress.growth["val_loss_before"],
                                 "growth/val_loss_after": progress.growth["val_loss_after"]})
            outcome = loop.run(signals)
            if outcome != "complete":
                path = loop.checkpoint()
                console.print(f"[yellow]stopped at the step boundary before {outcome} would be "
                              f"exceeded[/]; checkpoint {path}")
                entry = {**loop.summary_entry(), "checkpoint": str(path)}
                return _finish(ctx, progress.completed + [entry], f"stopped: {outcome}")
            entry = loop.summary_entry()
            entry["checkpoint"] = str(checkpoint_dir(ctx.run_dir, index, stages[index].name, progress.step))
            progress.completed = progress.completed + [entry]
            final = loop.checkpoint(complete=True)
            failpoint("stage.complete")
            ctx.tracker.finish_stage(stages[index].name)
            _mark_finished(ctx, index)
            console.print(f"[green]stage {stages[index].name} done[/]: val loss {progress.val_loss:.4f}")
            if index + 1 == len(stages):
                return _finish(ctx, progress.completed, "complete")
            if index == only:  # one stage per job: growth into the next happens in its own job
                return _finish(ctx, progress.completed, f"stopped: run.only_stage={stages[index].name} done")
            handoff = None
            if loop.written is not None:  # this process wrote `final` whole
                handoff = {"written": loop.written, "engine": engine}
            engine = loop = None  # the handoff holds the only references now
            engine, progress = _grow_into(ctx, index + 1, final, handoff)
            _save_growth_checkpoint(ctx, engine, progress)


def _save_growth_checkpoint(ctx: RunContext, engine, progress: StageProgress) -> None:
    """Step 0 of a grown stage: the growth is done once, even if the run dies right after."""
    stage = ctx.cfg.schedule.stages[progress.index]
    loop = StageLoop(ctx, stage, ctx.specs[progress.index], engine, progress)
    loop.checkpoint()


def _finish(ctx: RunContext, entries: list[dict], status: str) -> dict:
    if not is_leader(ctx.cfg):
        return {"status": status}
    for e in entries:  # a stage run created after the store came back has its id only now
        e["mlflow_run_id"] = ctx.tracker.run_id(e["name"]) or e.get("mlflow_run_id")
    summary = build_summary(entries, ctx.ledger, ctx.tracker.info, status)
    write_summary(ctx.run_dir, summary)
    growth_steps, step = [], 0
    for e in entries:
        if e["growth"]:
            growth_steps.append((step, e["name"]))
        step += e["steps"]
    plot = plot_losses(ctx.run_dir / "metrics.jsonl", ctx.run_dir / "loss.png", growth_steps)
    print_table(ctx.console, summary)
    for path in (ctx.run_dir / "config.json", ctx.run_dir / "summary.json", plot):
        ctx.tracker.artifact(path)
    ctx.tracker.finish("FINISHED")  # a budget stop is a clean end too; a resume reopens the runs
    ctx.console.print(f"summary: {ctx.run_dir / 'summary.json'}")
    return summary
