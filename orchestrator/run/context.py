"""What every stage of one run process shares, as one typed object built once before the
first stage (`runner.open_run`) and handed down to the stage loop and the transitions."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from orchestrator.budget.control import RunBudget
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.config.schema import RunConfig
from orchestrator.data import PreparedData
from orchestrator.engines.registry import EngineKind
from orchestrator.run.evaluation import ValSet, val_sets
from orchestrator.schedule import ResolvedStage, Schedule
from orchestrator.tracking.mlflow_tracker import NullTracker
from orchestrator.tracking.report import MetricsLog


@dataclass
class ValidationSets:
    """Each source's fixed validation batches, built on first use per (batch size, context,
    sources) and reused: every evaluation and growth check of a shape reads the same ones."""

    data: PreparedData
    n_batches: int
    _built: dict = field(default_factory=dict, init=False)
    _token_bytes: object = field(default=None, init=False)  # the tokenizer's bytes per id, for bits-per-byte

    def of(self, stage: ResolvedStage) -> dict[str, ValSet]:
        """The sources the stage's mixture reads (with a positive ratio), all of them without one."""
        s = stage.config
        names = sorted(n for n, w in s.mixture.items() if w > 0) if s.mixture else sorted(self.data.val)
        key = (s.batch_size, s.seq_len, tuple(names))
        if key not in self._built:
            if self._token_bytes is None:
                self._token_bytes = self.data.tokenizer.token_bytes()
            self._built[key] = val_sets({n: self.data.val[n] for n in names}, self._token_bytes,
                                        s.batch_size, s.seq_len, self.n_batches)
        return self._built[key]


@dataclass(frozen=True)
class RunContext:
    """One run process: its config and resolved schedule, run directory, prepared data, the
    engine kind that builds each stage's engine, the budget (holding the run's one ledger),
    metrics.jsonl, the tracker, the console, the checkpointer, and whether this process is
    the one that logs, tracks and reports (rank 0, or the only process)."""

    cfg: RunConfig
    schedule: Schedule
    run_dir: Path
    data: PreparedData
    engines: EngineKind
    budget: RunBudget
    metrics: MetricsLog
    tracker: NullTracker
    console: Console
    checkpointer: Checkpointer
    leader: bool
    validation: ValidationSets

    def engine(self, stage: ResolvedStage):
        """A new engine for `stage`, empty until it loads a state."""
        return self.engines.create(self.cfg, stage)

    def val_sets(self, stage: ResolvedStage) -> dict[str, ValSet]:
        return self.validation.of(stage)

    def val_batches(self, stage: ResolvedStage) -> list[torch.Tensor]:
        """All the sources' validation batches together: their mean loss is `val/loss`."""
        return [b for v in self.val_sets(stage).values() for b in v.batches]

    def log(self, stage: str, step: int, metrics: dict) -> None:
        """On disk first (metrics.jsonl), then to MLflow when the tracker's flush is due."""
        self.metrics.write(stage, step, metrics)
        self.tracker.flush()
