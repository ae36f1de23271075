"""What the transition into a stage records: the growth (operator, validation loss before
and after, whether the operator's guarantee was checked, in which dtype, when and for how
long) and the RoPE switch that may follow it.

It travels as JSON in every checkpoint's meta.json ("growth") and in summary.json (each
stage's "growth"), so `to_dict` writes exactly the keys it always has, in the same order,
and `from_dict` reads records of every earlier release (no check_dtype, no timing) back to
the same JSON. Torch-free: the Slurm job helpers read run state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class PositionSwitch:
    """A stage's switch of RoPE scaling (theta, interpolation): not function-preserving, so
    its loss change is reported, not checked."""

    scaling_from: dict
    scaling_to: dict
    val_loss_before: float
    val_loss_after: float

    def to_dict(self) -> dict:
        return {"from": self.scaling_from, "to": self.scaling_to, "val_loss_before": self.val_loss_before,
                "val_loss_after": self.val_loss_after}

    @classmethod
    def from_dict(cls, d: dict) -> "PositionSwitch":
        return cls(d["from"], d["to"], d["val_loss_before"], d["val_loss_after"])


# Keys written only when set (never null in any release), in this order after the others.
_OPTIONAL = ("check_dtype", "started_at", "seconds", "positions", "val_loss_after_growth", "phases")


@dataclass(frozen=True)
class GrowthRecord:
    """The transition into a stage. `operator` None: no growth, only a RoPE switch. With
    both, `val_loss_after` is after the switch and `val_loss_after_growth` before it."""

    operator: str | None
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    preserves_function: bool | None = None  # True: the loss was checked against the tolerance
    check_dtype: str | None = None  # the dtype the losses were computed in
    started_at: float | None = None  # of a growth (epoch seconds), and its duration
    seconds: float | None = None
    positions: PositionSwitch | None = None
    val_loss_after_growth: float | None = None
    phases: dict | None = None  # seconds of the growth's phases (run/transition.py `_grow`)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def grew(self) -> bool:
        """A growth, not a RoPE switch alone."""
        return bool(self.operator)

    @property
    def checked(self) -> bool:
        """The function was checked to be kept (a preserving operator's guarantee)."""
        return bool(self.preserves_function)

    @property
    def delta(self) -> float | None:
        """Validation loss after minus before (the whole transition)."""
        if self.val_loss_before is None or self.val_loss_after is None:
            return None
        return self.val_loss_after - self.val_loss_before

    def with_switch(self, switch: PositionSwitch) -> "GrowthRecord":
        """This growth followed by `switch`: the record's loss after is the switch's."""
        return replace(self, positions=switch, val_loss_after=switch.val_loss_after,
                       val_loss_after_growth=self.val_loss_after)

    def to_dict(self) -> dict:
        out = {"operator": self.operator}
        for key in ("val_loss_before", "val_loss_after", "preserves_function"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to_dict() if isinstance(value, PositionSwitch) else value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict | None) -> "GrowthRecord | None":
        if d is None:
            return None
        known = {"operator", "val_loss_before", "val_loss_after", "preserves_function", *_OPTIONAL}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(operator=d.get("operator"), val_loss_before=d.get("val_loss_before"),
                   val_loss_after=d.get("val_loss_after"), preserves_function=d.get("preserves_function"),
                   check_dtype=d.get("check_dtype"), started_at=d.get("started_at"), seconds=d.get("seconds"),
                   positions=PositionSwitch.from_dict(d["positions"]) if d.get("positions") else None,
                   val_loss_after_growth=d.get("val_loss_after_growth"), phases=d.get("phases"), extra=extra)
