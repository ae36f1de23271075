"""Growth operators on the canonical model state. Depends on torch only: no engine,
Hydra or MLflow.

Each operator is a `GrowthOperator` (growth_ops/operator.py) that declares its guarantee
(`preserves_function`), its options (`inits`, `default_moments`, masks and their minimum
ramp) and its parts: `check`, `plan`, `fill`, `finish`. `grow` grows a whole state in memory;
`iter_grown` grows a checkpoint tensor by tensor from the same parts.
"""
from . import clone, msg, stack, zero
from .common import GrowthError, GrowthPlan, iter_grown, iter_moments
from .masks import MaskState
from .operator import GrowthOperator
from .spec import ModelSpec, count_parameters, parameter_axes

OPERATORS: dict[str, GrowthOperator] = {m.OPERATOR.name: m.OPERATOR for m in (msg, zero, clone, stack)}


def get_operator(name: str) -> GrowthOperator:
    if name not in OPERATORS:
        raise GrowthError("operator", f"unknown growth operator {name!r}; "
                                      f"allowed: {', '.join(OPERATORS)}")
    return OPERATORS[name]


__all__ = ["GrowthError", "GrowthOperator", "GrowthPlan", "MaskState", "ModelSpec", "OPERATORS",
           "count_parameters", "get_operator", "iter_grown", "iter_moments", "parameter_axes"]
