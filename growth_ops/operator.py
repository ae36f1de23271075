"""A growth operator: a subclass of `GrowthOperator` declares its options and guarantee
and implements its parts; the calls the orchestrator makes (`check`, `plan`, `prepare`,
`grow`, `grow_moments`) and their signatures are declared here once.

`grow` (whole state in memory) and the offline tensor-by-tensor path (`plan`, `fill`,
`finish` through `grown_tensors.iter_grown`) are built from the same parts, so they grow
the same bits.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import GrowthError
from .grown_tensors import GetOld, grow_state
from .layer_placement import LayerInsert, new_layer_positions
from .masks import MaskState
from .moments import MOMENT_RULES, grow_moments_with
from .plan import GrowthPlan
from .spec import ModelSpec
from .target_rules import check_choice, check_common, check_experts


@dataclass(frozen=True)
class GrowthOptions:
    """A growth's options (growth.layer_insert, growth.init, growth.moments) with the
    operator's defaults in place of unset ones."""
    layer_insert: LayerInsert
    init: str
    moments: str
    drop_ratio: float = 0.0  # drop_upcycle: the share of each expert's intermediate dims re-initialised


class GrowthOperator(ABC):
    name: ClassVar[str]
    preserves_function: ClassVar[bool]  # the grown model computes exactly the old function
    inits: ClassVar[tuple[str, ...]]  # how new weights may be initialised (growth.init); the first is the default
    default_moments: ClassVar[str]  # Adam moment rule (growth.moments) when not set
    uses_masks: ClassVar[bool] = False  # masked growth (msg): `masks` gives the ramp
    upcycles: ClassVar[bool] = False  # turns a dense FFN into a mixture of experts (upcycle)
    min_ramp_steps: ClassVar[int] = 0
    default_ramp_steps: ClassVar[int] = 0  # grow()'s, when none is given

    # -- the parts an operator implements ---------------------------------------------

    def check_target(self, old: ModelSpec, new: ModelSpec) -> None:
        """The operator's own rules on the target, after `check_common`: raises GrowthError."""

    def check_layer_insert(self, layer_insert: LayerInsert, old: ModelSpec, new: ModelSpec) -> None:
        new_layer_positions(layer_insert, old.layers, new.layers)

    def check_base(self, old: ModelSpec, new: ModelSpec, init: str | None) -> None:
        """Rules that depend on the chosen `init` (upcycle: the dense growth's operator)."""

    def drop_ratio_of(self, drop_ratio: float | None) -> float:
        """The checked drop ratio (growth.drop_ratio): drop_upcycle's alone."""
        if drop_ratio is not None:
            raise GrowthError("drop_ratio", f"{self.name} re-initialises nothing; drop_ratio applies to "
                                            "drop_upcycle only; allowed: null")
        return 0.0

    @abstractmethod
    def build_plan(self, old: ModelSpec, new: ModelSpec, options: GrowthOptions) -> GrowthPlan:
        """The plan of a checked growth."""

    @abstractmethod
    def fill(self, plan: GrowthPlan, name: str, shape: tuple, get_old: GetOld,
             generator: torch.Generator | None) -> torch.Tensor:
        """The new entries of a grown tensor (a `grown_tensors.Fill`)."""

    def finish(self, plan: GrowthPlan, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A last pass over a grown tensor (a `grown_tensors.Finish`); none by default."""
        return tensor

    def masks(self, plan: GrowthPlan, ramp_steps: int) -> MaskState | None:
        """The masks of masked growth (operators with `uses_masks`)."""
        return None

    # -- the calls, the same for every operator -----------------------------------------

    def options(self, layer_insert: LayerInsert = "append", init: str | None = None,
                moments: str | None = None, drop_ratio: float | None = None) -> GrowthOptions:
        return GrowthOptions(layer_insert, init or self.inits[0], moments or self.default_moments,
                             self.drop_ratio_of(drop_ratio))

    def check(self, old: ModelSpec, new: ModelSpec, layer_insert: LayerInsert = "append", init: str | None = None,
              moments: str | None = None, drop_ratio: float | None = None) -> None:
        """Raises GrowthError, naming the field and its allowed values, for a growth this
        operator cannot do."""
        check_common(old, new)
        check_experts(old, new, self.name, self.upcycles)
        self.check_target(old, new)
        self.check_base(old, new, init)
        self.check_layer_insert(layer_insert, old, new)
        options = self.options(layer_insert, init, moments, drop_ratio)
        check_choice("init", options.init, self.inits, self.name)
        check_choice("moments", options.moments, MOMENT_RULES, self.name)

    def plan(self, old: ModelSpec, new: ModelSpec, layer_insert: LayerInsert = "append", init: str | None = None,
             moments: str | None = None, drop_ratio: float | None = None) -> GrowthPlan:
        return self.build_plan(old, new, self.options(layer_insert, init, moments, drop_ratio))

    def check_ramp_steps(self, ramp_steps: int) -> None:
        if ramp_steps < 0:
            raise GrowthError("ramp_steps", f"{ramp_steps} is negative; allowed: >= {self.min_ramp_steps}")
        if ramp_steps < self.min_ramp_steps:
            raise GrowthError("ramp_steps", f"{ramp_steps} is not allowed for {self.name}: its masks start at 0 "
                                            "(the old function) and reach 1 after ramp_steps steps; at 0 the "
                                            "new random weights would be live at once; allowed: >= "
                                            f"{self.min_ramp_steps}")

    def prepare(self, old: ModelSpec, new: ModelSpec, *, ramp_steps: int | None = None,
                layer_insert: LayerInsert = "append", init: str | None = None,
                moments: str | None = None, drop_ratio: float | None = None) -> tuple[GrowthPlan, MaskState | None]:
        """The checked plan and masks of a growth, before any tensor is built (tensor by
        tensor growth builds them from the plan with `iter_grown`)."""
        self.check(old, new, layer_insert, init, moments, drop_ratio)
        plan = self.plan(old, new, layer_insert, init, moments, drop_ratio)
        masks = None
        if self.uses_masks:
            ramp_steps = self.default_ramp_steps if ramp_steps is None else ramp_steps
            self.check_ramp_steps(ramp_steps)
            masks = self.masks(plan, ramp_steps)
        return plan, masks

    def grow(self, state: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec, *, ramp_steps: int | None = None,
             layer_insert: LayerInsert = "append", generator: torch.Generator | None = None, init: str | None = None,
             moments: str | None = None,
             drop_ratio: float | None = None) -> tuple[dict[str, torch.Tensor], MaskState | None, GrowthPlan]:
        """The grown state, the masks that keep it equal to the old function (None for an
        operator without masks), and the plan (for carrying optimizer moments)."""
        plan, masks = self.prepare(old, new, ramp_steps=ramp_steps, layer_insert=layer_insert, init=init,
                                   moments=moments, drop_ratio=drop_ratio)
        return grow_state(plan, self.fill, state, generator, self.finish), masks, plan

    def grow_moments(self, moments: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec,
                     plan: GrowthPlan, kind: str = "exp_avg") -> dict[str, torch.Tensor]:
        """Adam moments (`kind`) of the grown state, by the plan's moment rule."""
        return grow_moments_with(plan, moments, kind)
