"""Run a growth schedule: resume from the latest checkpoint, grow between stages (checking
the function is preserved), train each stage, and report."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from growth_ops import ModelSpec

from orchestrator.budget.control import RunBudget
from orchestrator.checkpoint.canonical import (CheckpointError, checkpoint_dir, latest_checkpoint,
                                               open_checkpoint, read_meta, seal_and_publish)
from orchestrator.config.schema import RunConfig
from orchestrator.config.validate import ConfigError
from orchestrator.data import new_cursor, prepare_data
from orchestrator.engines.registry import engine_kind
from orchestrator.faults import failpoint
from orchestrator.model import build_model
from orchestrator.proxy.scaling import predicted_vs_actual
from orchestrator.run.directory import checkpointed_before, pin_settings
from orchestrator.run.evaluation import ValSet, val_sets
from orchestrator.run.lock import RunLock, first_rank
from orchestrator.run.stage_loop import (SignalFlag, StageLoop, StopRequested, checkpoint_meta, save_state,
                                        set_rng_state)
from orchestrator.run.transition import check_same_model, start_stage
from orchestrator.run.state import NextStage, RunState, next_stage
from orchestrator.schedule import ResolvedStage, max_seq_len, resolve
from orchestrator.tracking.mlflow_tracker import make_tracker
from orchestrator.tracking.report import MetricsLog, build_summary, plot_losses, print_table, write_summary

def is_leader(cfg: RunConfig) -> bool:
    """Rank 0 of a multi-rank engine (or the only process) logs, tracks and reports."""
    return not engine_kind(cfg.engine.name).multi_rank or first_rank()


class Run:
    """What every stage of one run process shares: config, resolved schedule, data, budget,
    metrics, tracking, console. Data is prepared and the vocabulary checked before anything
    is written to the run directory."""

    def __init__(self, cfg: RunConfig, console: Console, leader: bool, extra_params: dict | None = None):
        self.cfg, self.console, self.leader = cfg, console, leader
        self.run_dir = Path(cfg.run_dir)
        self.kind = engine_kind(cfg.engine.name)
        self.data = prepare_data(cfg.data)
        tok = self.data.tokenizer.vocab_size
        self.schedule = resolve(cfg, tok)
        if self.schedule.vocab < tok:
            raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is below the tokenizer's {tok}")
        short_val = check_contexts_fit(cfg, self.data)
        if leader:
            pin_settings(self.run_dir, cfg)
        self.budget = RunBudget(self.schedule, console)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if leader else Path(os.devnull))
        self.tracker = make_tracker(cfg.tracking, self.run_dir, f"{cfg.schedule.name}:{self.run_dir.name}",
                                    {**_flat_params(dataclasses.asdict(cfg)), **(extra_params or {})}, console)
        self._val: dict = {}
        for warning in short_val if leader else ():
            console.print(f"[yellow]warning:[/] {warning}")
        self._token_bytes = None  # the tokenizer's bytes per id, for bits-per-byte

    def val_sets(self, stage: ResolvedStage) -> dict[str, ValSet]:
        """Each source's fixed validation batches: the sources the stage's mixture reads
        (with a positive ratio), all of them without a mixture."""
        s = stage.config
        names = sorted(n for n, w in s.mixture.items() if w > 0) if s.mixture else sorted(self.data.val)
        key = (s.batch_size, s.seq_len, tuple(names))
        if key not in self._val:
            if self._token_bytes is None:
                self._token_bytes = self.data.tokenizer.token_bytes()
            self._val[key] = val_sets({n: self.data.val[n] for n in names}, self._token_bytes,
                                      s.batch_size, s.seq_len, self.cfg.train.eval_batches)
        return self._val[key]

    def val_batches(self, stage: ResolvedStage) -> list[torch.Tensor]:
        """All the sources' validation batches together: their mean loss is `val/loss`."""
        return [b for v in self.val_sets(stage).values() for b in v.batches]

    def log(self, stage: str, step: int, metrics: dict) -> None:
        """On disk first (metrics.jsonl), then to MLflow when the tracker's flush is due."""
        self.metrics.write(stage, step, metrics)
        self.tracker.flush()

    def read_checkpoint(self, path: Path):
        """(weights, moments, meta), opened lazily: engines and growth read tensor by tensor
        (a slice-reading engine only its slices). Not hashed again: a run reads only what
        `_newest_checkpoint` has just verified or this job has just sealed (at scale, hashing
        on every rank would cost more than the reads)."""
        return open_checkpoint(path, check=False)

    def engine(self, stage: ResolvedStage):
        return self.kind.create(self.cfg, stage)

    def last_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir)


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


def _grow_into(run: Run, index: int, prev: RunState, source: dict):
    """Start stage `index` from the finished stage before it (`prev`), whose checkpoint's
    weights and moments `source` holds opened lazily ({"weights", "moments"}, and "engine":
    the finished engine when this process just trained it, for the 'before' loss). Entries
    are taken out of the dict, so the old engine is freed once it has served the check. The
    grown state is the stage's step-0 checkpoint: the growth happens once, even if the run
    dies right after."""
    stage = run.schedule[index]
    lr = stage.config.lr
    state = RunState(stage_index=index, stage_name=stage.name, steps_total=stage.steps, spec=stage.spec,
                     lr_peak=lr.peak if lr.peak is not None else prev.lr, data_cursor=prev.data_cursor,
                     ledger=prev.ledger, global_step_start=prev.global_step,
                     completed_stages=prev.completed_stages)
    run.budget.ledger = state.ledger
    engine, state.growth, grown = start_stage(run, stage, source.pop("weights"), source.pop("moments"),
                                              prev.spec, prev.optimizer_step, prev.stage_name,
                                              source.pop("engine", None))
    if grown is None:  # same shape: nothing grown, the engine writes its state
        save_state(run, engine, state)
        return engine, state
    state.optimizer_step = prev.optimizer_step
    meta = checkpoint_meta(run, engine, state)
    role = engine.shard_role()
    if role is None or role.leader:  # the files the engine loaded are what it would export now
        seal_and_publish(grown, checkpoint_dir(run.run_dir, index, stage.name, 0), meta)
        run.tracker.flush(force=True)
    if role is not None:
        role.barrier()
    return engine, state


def _fresh_start(run: Run):
    """Stage 1 from a fresh initialisation, or from `init_from` (an imported or earlier
    checkpoint), grown into stage 1's shape if it is smaller."""
    cfg, stage = run.cfg, run.schedule[0]
    state = RunState(stage_index=0, stage_name=stage.name, steps_total=stage.steps, spec=stage.spec,
                     lr_peak=stage.config.lr.peak, data_cursor=new_cursor(sorted(run.data.train)),
                     ledger=run.budget.ledger)
    if cfg.init_from is None:
        engine = run.engine(stage)
        engine.load(build_model(stage.spec, seed=cfg.seed).canonical_state(), None, 0, None)
        return engine, state
    weights, _, meta = open_checkpoint(Path(cfg.init_from).expanduser())
    spec = ModelSpec.from_dict(meta["spec"])
    # the run starts at model.rope_theta without interpolation; stage 1's `position` may switch from there
    start = dataclasses.replace(stage.spec, rope_theta=cfg.model.rope_theta, rope_interpolation=1.0)
    check_same_model(spec, start, "init_from")
    engine, state.growth, grown = start_stage(run, stage, weights, None, spec, 0, Path(cfg.init_from).name)
    if grown is not None:  # loaded; the stage's first checkpoint is written by training
        role = engine.shard_role()
        if role is not None:
            role.barrier()
        if role is None or role.leader:
            shutil.rmtree(grown, ignore_errors=True)
    state.masks = engine.masks
    return engine, state


def _resume_stage(run: Run, ckpt: Path):
    weights, moments, meta = run.read_checkpoint(ckpt)
    state = RunState.from_meta(meta)
    stage = run.schedule[state.stage_index]
    if state.spec.rope_scaling() != stage.spec.rope_scaling():  # the config is pinned: a damaged meta
        raise CheckpointError(f"{ckpt}: RoPE scaling {state.spec.rope_scaling()} differs from stage "
                              f"{stage.name!r}'s {stage.spec.rope_scaling()}")
    engine = run.engine(stage)
    check_same_model(state.spec, stage.spec, "run_dir")
    engine.load(weights, moments, state.optimizer_step, state.masks)
    set_rng_state(state.rng)
    run.budget.ledger = state.ledger
    if state.saved_at:  # a restart (requeue, preemption, crash): time since the checkpoint is lost
        state.ledger.add_lost(state.stage_name, max(0.0, time.time() - state.saved_at))
    return engine, state


def _only_stage(run: Run, nxt: NextStage) -> int | None:
    """`run.only_stage`: the index to stop after, or None. Raises ConfigError if the stages
    before it are not finished; returns -1 if that stage is already finished."""
    name = run.cfg.run.only_stage
    if name is None:
        return None
    only, names = run.schedule.index(name), run.schedule.names
    current = len(names) if nxt.done else nxt.index
    if only < current:
        return -1
    if only > current:
        done = names[current - 1] if current else "nothing"
        raise ConfigError("run.only_stage", f"stage {name!r} needs {names[only - 1]!r} finished first "
                                            f"(finished so far: {done}) in {run.run_dir}")
    return only


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
        run = Run(cfg, console, leader, extra_params)
        try:
            summary = _run(run)
        except StopRequested as stop:
            console.print(f"[yellow]{stop}[/]; run the same command again to resume")
            run.tracker.finish("KILLED")
            raise
        except BaseException:
            run.tracker.finish("FAILED")
            raise
        finally:
            run.metrics.close()
    return summary


def _newest_checkpoint(run: Run) -> Path | None:
    """The newest intact checkpoint; refuses to start over where a run already spent."""
    damaged: list[str] = []
    ckpt = latest_checkpoint(run.run_dir, damaged)
    for problem in damaged:
        run.console.print(f"[yellow]warning:[/] damaged checkpoint skipped: {problem}")
    if ckpt is None and (damaged or checkpointed_before(run.run_dir, run.cfg)) \
            and not run.cfg.checkpoint.allow_fresh_start:
        why = f"{len(damaged)} damaged" if damaged else "none left, but the run wrote some before (metrics.jsonl, summary.json)"
        raise CheckpointError(f"no intact checkpoint in {run.run_dir / 'checkpoints'} ({why}); refusing to "
                              "start from scratch and lose what was spent - pass "
                              "checkpoint.allow_fresh_start=true to do that")
    return ckpt


def _begin(run: Run, nxt: NextStage, ckpt: Path | None, meta: dict | None):
    """The engine and run state of the stage that runs next."""
    if nxt.action == "fresh":
        return _fresh_start(run)
    if nxt.action == "grow":
        run.console.print(f"resuming after stage {meta['stage_name']} from {ckpt}")
        weights, moments, _ = run.read_checkpoint(ckpt)
        return _grow_into(run, nxt.index, RunState.from_meta(meta), {"weights": weights, "moments": moments})
    run.console.print(f"resuming stage {meta['stage_name']} at step {meta['step']} from {ckpt}")
    return _resume_stage(run, ckpt)


def _run(run: Run) -> dict:
    console, schedule = run.console, run.schedule
    ckpt = _newest_checkpoint(run)
    meta = read_meta(ckpt) if ckpt else None
    nxt = next_stage(meta, len(schedule))
    only = _only_stage(run, nxt)
    if only == -1:
        console.print(f"stage {run.cfg.run.only_stage} of {run.run_dir} already finished; nothing to do")
        run.tracker.finish("FINISHED")
        return {"status": "already finished"}
    if nxt.done:
        console.print(f"{run.run_dir} already finished; nothing to do")
        state = RunState.from_meta(meta)
        run.budget.ledger = state.ledger
        return _finish(run, state.completed_stages, "complete")
    engine, state = _begin(run, nxt, ckpt, meta)
    with SignalFlag() as signals:
        while True:
            index, stage = state.stage_index, schedule[state.stage_index]
            loop = StageLoop(run, stage, engine, state)
            outcome = loop.train(signals)
            if outcome != "complete":
                path = save_state(run, engine, state)
                console.print(f"[yellow]stopped at the step boundary before {outcome} would be "
                              f"exceeded[/]; checkpoint {path}")
                entry = {**loop.summary_entry(), "checkpoint": str(path)}
                return _finish(run, state.completed_stages + [entry], f"stopped: {outcome}")
            entry = loop.summary_entry()
            entry["checkpoint"] = str(checkpoint_dir(run.run_dir, index, stage.name, state.step))
            state.completed_stages = state.completed_stages + [entry]
            final = save_state(run, engine, state, complete=True)
            failpoint("stage.complete")
            run.tracker.finish_stage(stage.name)
            console.print(f"[green]stage {stage.name} done[/]: val loss {state.val_loss:.4f}")
            if index + 1 == len(schedule):
                return _finish(run, state.completed_stages, "complete")
            if index == only:  # one stage per job: growth into the next happens in its own job
                return _finish(run, state.completed_stages, f"stopped: run.only_stage={stage.name} done")
            weights, moments, _ = run.read_checkpoint(final)  # grown from disk, tensor by tensor
            source = {"weights": weights, "moments": moments, "engine": engine}
            engine = loop = None  # `source` holds the only reference now
            engine, state = _grow_into(run, index + 1, state, source)


def _finish(run: Run, entries: list[dict], status: str) -> dict:
    if not run.leader:
        return {"status": status}
    for e in entries:  # a stage run created after the store came back has its id only now
        e["mlflow_run_id"] = run.tracker.run_id(e["name"]) or e.get("mlflow_run_id")
    summary = build_summary(entries, run.budget.ledger, run.tracker.written_info, status)
    growth_steps, step = [], 0
    for e in entries:
        if e["growth"] and e["growth"]["operator"]:  # not a RoPE switch alone
            growth_steps.append((step, e["name"]))
        step += e["steps"]
    if run.cfg.plan.loss_fit and status == "complete":  # predicted vs actual, into MLflow and the summary
        summary["loss_prediction"] = predicted_vs_actual(run.cfg.plan.loss_fit, run.schedule[-1].spec,
                                                         entries[-1]["val_loss"])
        run.log(entries[-1]["name"], step, {f"predict/{k}": v for k, v in summary["loss_prediction"].items()
                                            if isinstance(v, float)})
    write_summary(run.run_dir, summary)
    plot = plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png", growth_steps)
    print_table(run.console, summary)
    for path in (run.run_dir / "config.json", run.run_dir / "summary.json", plot):
        run.tracker.artifact(path)
    run.tracker.finish("FINISHED")  # a budget stop is a clean end too; a resume reopens the runs
    run.console.print(f"summary: {run.run_dir / 'summary.json'}")
    return summary
