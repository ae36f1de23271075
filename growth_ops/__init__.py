"""Growth operators on the canonical model state. Depends on torch only: no engine,
Hydra or MLflow.

An operator module provides `check_growth(old, new, layer_insert, init, moments)`,
`grow(state, old, new, *, ramp_steps, layer_insert, generator, init, moments) -> (state,
masks or None, plan)`, `grow_moments(moments, old, new, plan, kind)`, the pieces `grow` is
made of (`plan_growth`, `fill`, `finish`, used to grow a checkpoint tensor by tensor), and
`PRESERVES_FUNCTION`, `USES_MASKS`, `INITS`, `DEFAULT_MOMENTS`. The operator with masks (msg)
also provides `masks_for`, `check_ramp_steps` (a ramp of at least one step, so growth starts
at mask 0) and `unmasked_plan` (the plan that takes the masked structure out again).
"""
from types import ModuleType

from . import clone, msg, stack, zero
from .common import GrowthError, GrowthPlan, iter_grown, iter_moments
from .masks import MaskState
from .spec import ModelSpec, count_parameters, parameter_axes

OPERATORS: dict[str, ModuleType] = {"msg": msg, "zero": zero, "clone": clone, "stack": stack}


def get_operator(name: str) -> ModuleType:
    if name not in OPERATORS:
        raise GrowthError("operator", f"unknown growth operator {name!r}; "
                                      f"allowed: {', '.join(OPERATORS)}")
    return OPERATORS[name]


__all__ = ["GrowthError", "GrowthPlan", "MaskState", "ModelSpec", "OPERATORS", "count_parameters",
           "get_operator", "iter_grown", "iter_moments", "parameter_axes"]
