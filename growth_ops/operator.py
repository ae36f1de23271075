"""A growth operator as one declared object: its options, its guarantee and its parts.

`grow` (whole state in memory) and the offline tensor-by-tensor path (`plan`, `fill`,
`finish` through `common.iter_grown`) are built from the same parts, so they grow the same
bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .common import GrowthError, GrowthPlan, grow_moments_with, grow_state
from .masks import MaskState
from .spec import ModelSpec


@dataclass(frozen=True)
class GrowthOperator:
    name: str
    preserves_function: bool  # the grown model computes exactly the old function
    inits: tuple[str, ...]  # how new weights may be initialised (growth.init)
    default_moments: str  # Adam moment rule (growth.moments) when not set
    check: Callable[..., None]  # (old, new, layer_insert, init, moments): raises GrowthError
    plan: Callable[..., GrowthPlan]  # (old, new, layer_insert, init, moments)
    fill: Callable  # (plan, name, shape, get_old, generator): the new entries of a grown tensor
    finish: Callable | None = None  # (plan, name, tensor): a last pass over a grown tensor
    masks: Callable[[GrowthPlan, int], MaskState] | None = None  # masked growth (msg): the ramp
    min_ramp_steps: int = 0
    default_ramp_steps: int = 0  # grow()'s, when none is given

    @property
    def uses_masks(self) -> bool:
        return self.masks is not None

    def check_ramp_steps(self, ramp_steps: int) -> None:
        if ramp_steps < 0:
            raise GrowthError("ramp_steps", f"{ramp_steps} is negative; allowed: >= {self.min_ramp_steps}")
        if ramp_steps < self.min_ramp_steps:
            raise GrowthError("ramp_steps", f"{ramp_steps} is not allowed for {self.name}: its masks start at 0 "
                                            "(the old function) and reach 1 after ramp_steps steps; at 0 the "
                                            "new random weights would be live at once; allowed: >= "
                                            f"{self.min_ramp_steps}")

    def grow(self, state: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec, *, ramp_steps: int | None = None,
             layer_insert="append", generator: torch.Generator | None = None, init: str | None = None,
             moments: str | None = None) -> tuple[dict[str, torch.Tensor], MaskState | None, GrowthPlan]:
        """The grown state, the masks that keep it equal to the old function (None for an
        operator without masks), and the plan (for carrying optimizer moments)."""
        plan, masks = self.prepare(old, new, ramp_steps=ramp_steps, layer_insert=layer_insert, init=init,
                                   moments=moments)
        return grow_state(plan, self.fill, state, generator, self.finish), masks, plan

    def prepare(self, old: ModelSpec, new: ModelSpec, *, ramp_steps: int | None = None, layer_insert="append",
                init: str | None = None, moments: str | None = None) -> tuple[GrowthPlan, MaskState | None]:
        """The checked plan and masks of a growth, before any tensor is built (tensor by
        tensor growth builds them from the plan with `iter_grown`)."""
        self.check(old, new, layer_insert, init, moments)
        plan = self.plan(old, new, layer_insert, init, moments)
        masks = None
        if self.masks is not None:
            ramp_steps = self.default_ramp_steps if ramp_steps is None else ramp_steps
            self.check_ramp_steps(ramp_steps)
            masks = self.masks(plan, ramp_steps)
        return plan, masks

    def grow_moments(self, moments: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec,
                     plan: GrowthPlan, kind: str = "exp_avg") -> dict[str, torch.Tensor]:
        """Adam moments (`kind`) of the grown state, by the plan's moment rule."""
        return grow_moments_with(plan, moments, kind)
