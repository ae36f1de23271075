"""Where a run is, as one object, and the one rule for what runs next.

`RunState` is what a checkpoint's meta.json holds (a round trip: `to_meta` / `from_meta`)
and what the stage loop advances step by step. `next_stage` decides, from the newest
checkpoint's meta alone, which stage runs next and how it starts; `grow run`, each
torchrun launch and each Slurm job ask it, so they cannot disagree. This module reads
JSON only, and imports growth_ops (hence torch) only inside `from_meta`, so the Slurm job
wrapper (`orchestrator.slurm.jobstate`, run before and after every job) stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.budget.ledger import Ledger
from orchestrator.checkpoint.layout import latest_meta  # noqa: F401 (the job helpers' import)
from orchestrator.run.growth_record import GrowthRecord

if TYPE_CHECKING:
    from growth_ops.masks import MaskState
    from growth_ops.spec import ModelSpec


@dataclass
class RunState:
    stage_index: int
    stage_name: str
    steps_total: int  # of this stage
    spec: "ModelSpec"
    lr_peak: float
    data_cursor: dict
    ledger: Ledger  # the run's one ledger (the budget reads and adds to this object)
    step: int = 0  # optimizer steps done in this stage
    global_step_start: int = 0  # steps of all earlier stages
    stage_complete: bool = False
    lr: float = 0.0
    val_loss: float | None = None
    growth: GrowthRecord | None = None  # the transition into this stage
    completed_stages: list = field(default_factory=list)  # summary entries of earlier stages
    masks: "MaskState | None" = None
    optimizer_step: int = 0
    rng: dict | None = None
    tracking: dict = field(default_factory=dict)
    saved_at: float | None = None
    # at a stage's end, when the next stage grows: the old model's loss on the growth check's
    # batches, taken while the engine was live (run/transition.py `next_check`)
    next_check: dict | None = None

    def __post_init__(self):
        if isinstance(self.growth, dict):  # as meta.json holds it
            self.growth = GrowthRecord.from_dict(self.growth)

    @property
    def global_step(self) -> int:
        return self.global_step_start + self.step

    def to_meta(self) -> dict:
        return {"stage_index": self.stage_index, "stage_name": self.stage_name, "step": self.step,
                "steps_total": self.steps_total, "global_step": self.global_step,
                "stage_complete": self.stage_complete, "spec": self.spec.to_dict(),
                "masks": None if self.masks is None or self.masks.done else self.masks.to_dict(),
                "lr_peak": self.lr_peak, "lr": self.lr, "data_cursor": self.data_cursor, "rng": self.rng,
                "ledger": self.ledger.to_dict(), "tracking": self.tracking,
                "growth": None if self.growth is None else self.growth.to_dict(),
                "val_loss": self.val_loss, "completed_stages": self.completed_stages,
                "saved_at": self.saved_at, "optimizer_step": self.optimizer_step,
                **({"next_check": self.next_check} if self.next_check is not None else {})}

    @classmethod
    def from_meta(cls, meta: dict) -> "RunState":
        from growth_ops.masks import MaskState  # noqa: F811 (see the module doc)
        from growth_ops.spec import ModelSpec  # noqa: F811

        return cls(stage_index=meta["stage_index"], stage_name=meta["stage_name"],
                   steps_total=meta["steps_total"], spec=ModelSpec.from_dict(meta["spec"]),
                   lr_peak=meta["lr_peak"], data_cursor=meta["data_cursor"],
                   ledger=Ledger.from_dict(meta["ledger"]), step=meta["step"],
                   global_step_start=meta["global_step"] - meta["step"],
                   stage_complete=meta["stage_complete"], lr=meta["lr"], val_loss=meta["val_loss"],
                   growth=GrowthRecord.from_dict(meta["growth"]), completed_stages=meta["completed_stages"],
                   masks=MaskState.from_dict(meta["masks"]), optimizer_step=meta.get("optimizer_step", 0),
                   rng=meta.get("rng"), tracking=meta.get("tracking") or {}, saved_at=meta.get("saved_at"),
                   next_check=meta.get("next_check"))


def check_resumable(meta: dict) -> None:
    """Raises KeyError, TypeError or ValueError unless a stage can resume from `meta` (it reads
    as a RunState, and its data cursor is one): a checkpoint that fails this is skipped
    (`Checkpointer.latest`) rather than failing every resume from it."""
    from orchestrator.data.batches import check_cursor  # numpy and torch: not for the job helpers

    RunState.from_meta(meta)
    check_cursor(meta["data_cursor"])


@dataclass(frozen=True)
class NextStage:
    """What a run does next: "fresh" (stage 0 from an initialisation), "resume" (a stage in
    flight), "grow" (into `index` from the finished stage before it), or "done"."""

    action: str
    index: int | None  # the stage that runs next; None when done

    @property
    def done(self) -> bool:
        return self.action == "done"


def next_stage(meta: dict | None, n_stages: int) -> NextStage:
    """From the newest intact checkpoint's meta (None: there is none)."""
    if meta is None:
        return NextStage("fresh", 0)
    index = meta["stage_index"]
    if not meta["stage_complete"]:
        return NextStage("resume", index)
    if index + 1 < n_stages:
        return NextStage("grow", index + 1)
    return NextStage("done", None)


def is_finished(meta: dict | None, index: int) -> bool:
    """Whether stage `index` is finished (a later stage started, or its final checkpoint is
    the newest): a requeued or resubmitted job then exits without training it again."""
    return meta is not None and (meta["stage_index"], meta["stage_complete"]) >= (index, True)

