"""The training loop of one stage: steps, evaluation, budget, checkpoints, metrics."""
from __future__ import annotations

import base64
import json
import math
import signal
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from growth_ops.spec import active_parameters, count_parameters

from orchestrator.budget.machine_peak import mfu_peak
from orchestrator.data import next_global_batch, tokens_read
from orchestrator.engines.base import Engine
from orchestrator.faults import failpoint
from orchestrator.run.context import RunContext
from orchestrator.run.evaluation import by_source, evaluate_sources
from orchestrator.run.lr import lr_at
from orchestrator.run.signals import take_pending
from orchestrator.run.state import RunState
from orchestrator.run.transition import next_check
from orchestrator.schedule import ResolvedStage


class StopRequested(Exception):
    """SIGTERM/SIGINT/SIGUSR1 arrived; a checkpoint was written."""

    def __init__(self, signum: int, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; nothing after the last good checkpoint is kept."""


class SignalFlag:
    """Turns stop signals into a flag checked at step boundaries."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._set)
        self.signum = take_pending()  # one that came while the job was starting up
        return self

    def _set(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def rng_state() -> dict:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(d: dict) -> None:
    raw = base64.b64decode(d["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def checkpoint_meta(ctx: RunContext, engine: Engine, state: RunState, complete: bool = False) -> dict:
    """meta.json of a checkpoint of `state` taken now (masks, RNG, tracking ids, time)."""
    state.stage_complete, state.masks = complete, engine.masks
    state.rng, state.tracking, state.saved_at = rng_state(), ctx.tracker.written_info, time.time()
    return json.loads(json.dumps(state.to_meta()))  # as meta.json reads back


def save_state(ctx: RunContext, engine: Engine, state: RunState, complete: bool = False) -> Path:
    """Checkpoint `state` with the engine's weights and moments (many ranks: each writes its
    share of full tensors); returns its path."""
    weights, moments, state.optimizer_step = engine.export()
    if complete:  # the growth into the next stage then needs no old model (a job of its own would rebuild it)
        state.next_check = next_check(ctx, state, engine)
    meta = checkpoint_meta(ctx, engine, state, complete)
    path = ctx.checkpointer.path(state.stage_index, state.stage_name, state.step)
    if ctx.checkpointer.save(path, weights, moments, meta, engine.shard_role()):
        ctx.tracker.flush(force=True)
    return path


class StageLoop:
    def __init__(self, ctx: RunContext, stage: ResolvedStage, engine: Engine, state: RunState):
        self.ctx, self.stage, self.engine, self.state = ctx, stage, engine, state
        mixture = stage.config.mixture
        self.streams = {n: ctx.data.train[n] for n in (sorted(mixture) if mixture else sorted(ctx.data.train))}
        self.mixture = mixture or None
        self.val_metrics: dict = {}  # of the last evaluation in this process
        device = getattr(engine, "device", None)
        # perf/mfu's peak per device: configured for a GPU, measured on this CPU (< 1 s, once per process)
        self.peak_flops, self.peak_source = mfu_peak(ctx.cfg.cluster.peak_tflops_per_gpu,
                                                     device.type if device is not None else "cuda")

    def _params(self) -> dict:
        s, st = self.stage.config, self.state
        return {"stage_index": st.stage_index, "params": count_parameters(self.stage.spec),
                "active_params": active_parameters(self.stage.spec), "moe.experts": self.stage.spec.experts,
                "moe.top_k": self.stage.spec.top_k,
                **{f"shape.{k}": v for k, v in vars(s.shape).items()}, "tokens": s.tokens,
                "steps": self.stage.steps, "batch_size": s.batch_size, "seq_len": s.seq_len,
                "long_seq_len": s.long_seq_len, "long_fraction": s.long_fraction,
                **(self.stage.spec.rope_scaling() if self.stage.spec.position == "rope" else {}),
                "lr_peak": st.lr_peak, "growth": st.growth.operator if st.growth else None,
                "perf.peak_tflops": round(self.peak_flops / 1e12, 4), "perf.peak_source": self.peak_source}

    def log(self, metrics: dict) -> None:
        self.ctx.log(self.stage.name, self.state.global_step, metrics)

    def evaluate(self) -> None:
        """Validation loss and bits-per-byte, per source and overall: logged, and kept for
        the summary (`state.val_loss`, `val_metrics`)."""
        self.state.val_loss, self.val_metrics = evaluate_sources(self.engine, self.ctx.val_sets(self.stage))
        self.log(self.val_metrics)

    def summary_entry(self) -> dict:
        ctx, name, ledger = self.ctx, self.stage.name, self.ctx.budget.ledger
        lay = self.stage.layout
        return {"name": name, "params": count_parameters(self.stage.spec),
                "active_params": active_parameters(self.stage.spec), "experts": self.stage.spec.experts,
                "tokens": ledger.stage(name).tokens, "steps": self.state.step, "flops": ledger.stage(name).flops,
                "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp},
                "val_loss": self.state.val_loss, "val_bpb": self.val_metrics.get("val/bpb"),
                "val_by_source": by_source(self.val_metrics),
                "tokens_by_source": dict(sorted(ledger.stage(name).sources.items())),
                "growth": self.state.growth.to_dict() if self.state.growth else None,
                "complete": self.state.step >= self.stage.steps, "checkpoint": None,
                "mlflow_run_id": ctx.tracker.run_id(name),
                "restarts": ledger.lost.get(name, {}).get("restarts", 0),
                "lost_s": ledger.lost.get(name, {}).get("lost_s", 0.0)}

    def train(self, signals: SignalFlag) -> str:
        """Train to the end of the stage. Returns "complete" or the budget cap that stopped it."""
        ctx, st, stage, cfg = self.ctx, self.state, self.stage, self.ctx.cfg
        lr_cfg = stage.config.lr
        ctx.tracker.stage_run(stage.name, self._params())  # the stage's MLflow run opens here
        if st.step == 0 and st.growth:
            self.log({"growth/val_loss_before": st.growth.val_loss_before,
                      "growth/val_loss_after": st.growth.val_loss_after,
                      **{f"transition/{k}_s": v for k, v in (st.growth.phases or {}).items()}})
            if st.growth.positions:  # RoPE's scaling switched (not function-preserving)
                switch = st.growth.positions
                self.log({"positions/val_loss_before": switch.val_loss_before,
                          "positions/val_loss_after": switch.val_loss_after})
        ctx.budget.stage_start(st.stage_index, st.step)
        last_step_s, mark = 0.0, time.perf_counter()
        with Progress(TextColumn(f"[bold]{stage.name}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                      console=ctx.console, transient=False) as bar:
            task = bar.add_task(stage.name, total=stage.steps, completed=st.step, info="")
            while st.step < stage.steps:
                cap = ctx.budget.blocks(stage, st.step, last_step_s)
                if cap:
                    return cap
                batch, cursor = next_global_batch(self.streams, st.data_cursor, self.mixture,
                                                  stage.config.batch_size, stage.seq_len_at(st.step))
                st.lr = lr_at(st.step, stage.steps, st.lr_peak, lr_cfg.warmup_steps, lr_cfg.min, lr_cfg.decay,
                              stage.lr_decay_steps)
                mask = self.engine.masks.value if self.engine.masks else 1.0
                loss, grad_norm = self.engine.train_step(batch, st.lr)
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"stage {stage.name} step {st.step + 1}: the training loss is {loss}; stopped "
                        f"without saving, so the last good checkpoint ({ctx.checkpointer.latest() or 'none'}) "
                        "stays the newest - lower the learning rate or check the data, then run again")
                failpoint("step.done")
                ctx.budget.ledger.add_source_tokens(stage.name, tokens_read(st.data_cursor, cursor))
                st.step, st.data_cursor = st.step + 1, cursor
                now = time.perf_counter()
                last_step_s, mark = now - mark, now
                compile_s = self.engine.compile_seconds()
                if compile_s is not None:
                    ctx.console.print(f"\\[{stage.name}] compiled in {compile_s:.1f} s "
                                      "(train.compile: the first step's time less the second's)")
                self._log(loss, grad_norm, mask, last_step_s, ctx.budget.count_step(stage, st.step, last_step_s),
                          {} if compile_s is None else {"perf/compile_s": compile_s})
                if st.step % cfg.train.eval_every_steps == 0 and st.step < stage.steps:
                    self.evaluate()
                if st.step % cfg.checkpoint.every_steps == 0 and st.step < stage.steps:
                    save_state(ctx, self.engine, st)
                bar.update(task, completed=st.step, info=f"loss {loss:.3f} lr {st.lr:.2e}")
                if signals.signum is not None:
                    raise StopRequested(signals.signum, save_state(ctx, self.engine, st))
        self.evaluate()
        return "complete"

    def _log(self, loss: float, grad_norm: float, mask: float, seconds: float, budget: dict, extra: dict) -> None:
        ctx, stage, total = self.ctx, self.stage, self.ctx.budget.ledger.total
        done = self.state.step - 1  # the step just taken (its context may be the long one)
        tokens_per_s = stage.tokens_at(done) / seconds if seconds > 0 else 0.0
        peak = self.peak_flops * self.engine.devices
        metrics = {"train/loss": loss, "train/lr": self.state.lr, "train/grad_norm": grad_norm, **self.engine.moe_metrics(),
                   "growth/mask": mask, "perf/tokens_per_s": tokens_per_s,
                   "perf/mfu": stage.flops_at(done) / seconds / peak if seconds > 0 else 0.0,
                   "train/seq_len": stage.seq_len_at(done),
                   "progress/tokens": total.tokens, "progress/flops": total.flops, **budget, **extra}
        self.log(metrics)
        if self.state.step % ctx.cfg.train.log_every_steps == 0 and not ctx.console.is_terminal:
            ctx.console.print(f"\\[{stage.name}] step {self.state.step}/{stage.steps} loss {loss:.4f} "
                              f"lr {self.state.lr:.2e} {tokens_per_s:,.0f} tok/s")
