"""The training loop of one stage: steps, evaluation, budget, checkpoints, metrics."""
from __future__ import annotations

import base64
import json
import signal
import time
from dataclasses import dataclass, field

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from growth_ops.spec import count_parameters

from orchestrator.budget import control as budget_watch
from orchestrator.checkpoint.canonical import checkpoint_dir, prune, save_checkpoint
from orchestrator.data import next_global_batch
from orchestrator.faults import failpoint
from orchestrator.run.lr import lr_at
from orchestrator.model import flops_per_token
from orchestrator.schedule import stage_steps


class StopRequested(Exception):
    """SIGTERM/SIGINT/SIGUSR1 arrived; a checkpoint was written."""

    def __init__(self, signum: int, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class SignalFlag:
    """Turns stop signals into a flag checked at step boundaries."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        from orchestrator.run.signals import take_pending
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


@dataclass
class StageProgress:
    """Everything about a stage in flight that a checkpoint must carry."""

    index: int
    step: int  # optimizer steps done in this stage
    global_step_start: int  # steps of all earlier stages
    lr_peak: float
    cursor: dict
    growth: dict | None
    lr: float = 0.0
    val_loss: float | None = None
    completed: list = field(default_factory=list)  # summary entries of earlier stages


class StageLoop:
    def __init__(self, ctx, stage, spec, engine, progress: StageProgress):
        self.ctx, self.stage, self.spec, self.engine, self.p = ctx, stage, spec, engine, progress
        self.written: tuple | None = None  # see checkpoint()
        self.steps = stage_steps(stage)
        self.step_tokens = stage.batch_size * stage.seq_len
        self.step_flops = flops_per_token(spec, stage.seq_len) * self.step_tokens
        self.names = sorted(stage.mixture) if stage.mixture else sorted(ctx.data.train)
        self.streams = {n: ctx.data.train[n] for n in self.names}
        self.mixture = stage.mixture or None
        ctx.tracker.stage_run(stage.name, self._params())

    def _params(self) -> dict:
        s = self.stage
        return {"stage_index": self.p.index, "params": count_parameters(self.spec),
                **{f"shape.{k}": v for k, v in vars(s.shape).items()}, "tokens": s.tokens,
                "steps": self.steps, "batch_size": s.batch_size, "seq_len": s.seq_len,
                "lr_peak": self.p.lr_peak, "growth": (self.p.growth or {}).get("operator")}

    # -- checkpoints -----------------------------------------------------------------
    def meta(self, complete: bool) -> dict:
        ctx, p = self.ctx, self.p
        masks = self.engine.masks
        return {"stage_index": p.index, "stage_name": self.stage.name, "step": p.step,
                "steps_total": self.steps, "global_step": p.global_step_start + p.step,
                "stage_complete": complete, "spec": self.spec.to_dict(),
                "masks": None if masks is None or masks.done else masks.to_dict(),
                "lr_peak": p.lr_peak, "lr": p.lr, "data_cursor": p.cursor, "rng": rng_state(),
                "ledger": ctx.ledger.to_dict(), "tracking": ctx.tracker.info, "growth": p.growth,
                "val_loss": p.val_loss, "completed_stages": p.completed, "saved_at": time.time()}

    def checkpoint(self, complete: bool = False):
        """Write a checkpoint of the current step. A single-writer engine's stage-final
        state stays in `self.written` (state, moments, meta), so the next stage can grow from
        it without reading back the files just written."""
        state, moments, opt_step = self.engine.export()
        meta = {**self.meta(complete), "optimizer_step": opt_step}
        path = checkpoint_dir(self.ctx.run_dir, self.p.index, self.stage.name, self.p.step)
        shard = getattr(self.engine, "checkpoint_shard", None)
        if shard is None:
            save_checkpoint(path, state, moments, meta)
            if complete:
                self.written = (state, moments, json.loads(json.dumps(meta)))  # as meta.json reads back
        else:  # many ranks: each writes its share of full tensors (engines/sharding.py)
            from orchestrator.checkpoint.sharded import save_sharded_checkpoint
            save_sharded_checkpoint(path, state, moments, meta, shard)
            if not shard["leader"]:
                return path
        prune(path.parent, self.ctx.cfg.checkpoint.keep)
        self.ctx.tracker.flush(force=True)
        return path

    # -- the loop --------------------------------------------------------------------
    def evaluate(self) -> float:
        return self.engine.evaluate(self.ctx.val_batches(self.stage))

    def summary_entry(self) -> dict:
        return {"name": self.stage.name, "params": count_parameters(self.spec),
                "tokens": self.ctx.ledger.stage(self.stage.name).tokens,
                "steps": self.p.step, "flops": self.ctx.ledger.stage(self.stage.name).flops,
                "layout": {"tp": self.stage.layout.tp, "pp": self.stage.layout.pp, "dp": self.stage.layout.dp},
                "val_loss": self.p.val_loss, "growth": self.p.growth,
                "complete": self.p.step >= self.steps, "checkpoint": None,
                "mlflow_run_id": self.ctx.tracker.run_id(self.stage.name),
                "restarts": self.ctx.ledger.lost.get(self.stage.name, {}).get("restarts", 0),
                "lost_s": self.ctx.ledger.lost.get(self.stage.name, {}).get("lost_s", 0.0)}

    def run(self, signals: SignalFlag) -> str:
        """Train to the end of the stage. Returns "complete" or the budget cap that stopped it."""
        ctx, p, s, cfg = self.ctx, self.p, self.stage, self.ctx.cfg
        lr_cfg = s.lr
        budget_watch.stage_start(self)
        last_step_s, mark = 0.0, time.perf_counter()
        with Progress(TextColumn(f"[bold]{s.name}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                      console=ctx.console, transient=False) as bar:
            task = bar.add_task(s.name, total=self.steps, completed=p.step, info="")
            while p.step < self.steps:
                cap = ctx.guard.blocks(ctx.ledger.total, self.step_tokens, self.step_flops,
                                       last_step_s, self.engine.devices)
                if cap:
                    return cap
                batch, cursor = next_global_batch(self.streams, p.cursor, self.mixture,
                                                  s.batch_size, s.seq_len)
                p.lr = lr_at(p.step, self.steps, p.lr_peak, lr_cfg.warmup_steps, lr_cfg.min, lr_cfg.decay)
                mask = self.engine.masks.value if self.engine.masks else 1.0
                loss, grad_norm = self.engine.train_step(batch, p.lr)
                failpoint("step.done")
                p.step, p.cursor = p.step + 1, cursor
                now = time.perf_counter()
                last_step_s, mark = now - mark, now
                spend = ctx.ledger.stage(s.name)
                spend.add(self.step_tokens, self.step_flops, last_step_s, self.engine.devices,
                          cfg.cluster.usd_per_gpu_hour)
                self._log(loss, grad_norm, mask, last_step_s)
                budget_watch.after_step(self, last_step_s)
                if p.step % cfg.train.eval_every_steps == 0 and p.step < self.steps:
                    p.val_loss = self.evaluate()
                    self._log_point({"val/loss": p.val_loss})
                if p.step % cfg.checkpoint.every_steps == 0 and p.step < self.steps:
                    self.checkpoint()
                bar.update(task, completed=p.step, info=f"loss {loss:.3f} lr {p.lr:.2e}")
                if signals.signum is not None:
                    raise StopRequested(signals.signum, self.checkpoint())
        p.val_loss = self.evaluate()
        self._log_point({"val/loss": p.val_loss})
        return "complete"

    def _log(self, loss: float, grad_norm: float, mask: float, seconds: float) -> None:
        ctx, total = self.ctx, self.ctx.ledger.total
        tokens_per_s = self.step_tokens / seconds if seconds > 0 else 0.0
        metrics = {"train/loss": loss, "train/lr": self.p.lr, "train/grad_norm": grad_norm,
                   "growth/mask": mask, "perf/tokens_per_s": tokens_per_s,
                   "perf/mfu": (self.step_flops / seconds) / (ctx.cfg.cluster.peak_tflops_per_gpu * 1e12
                                                             * self.engine.devices) if seconds > 0 else 0.0,
                   "progress/tokens": total.tokens, "progress/flops": total.flops,
                   "budget/spent_usd": total.cost_usd, "budget/gpu_hours": total.gpu_hours}
        if ctx.cfg.budget.max_usd is not None:
            metrics["budget/left_usd"] = ctx.cfg.budget.max_usd - total.cost_usd
        self._log_point(metrics)
        if self.p.step % ctx.cfg.train.log_every_steps == 0 and not ctx.console.is_terminal:
            ctx.console.print(f"\\[{self.stage.name}] step {self.p.step}/{self.steps} loss {loss:.4f} "
                              f"lr {self.p.lr:.2e} {tokens_per_s:,.0f} tok/s")

    def _log_point(self, metrics: dict) -> None:
        """On disk first (metrics.jsonl), then to MLflow when the tracker's flush is due."""
        self.ctx.metrics.write(self.stage.name, self.p.global_step_start + self.p.step, metrics)
        self.ctx.tracker.flush()
