"""Growth operators on the canonical model state. Depends on torch only: no engine,
Hydra or MLflow.

Each operator subclasses `GrowthOperator` (growth_ops/operator.py), which declares the
calls and their signatures once: an operator states its guarantee (`preserves_function`),
its options (`inits`, `default_moments`, masks and their minimum ramp) and implements its
parts: `check_target`, `build_plan`, `fill`, `finish`. `grow` grows a whole state in memory;
`iter_grown` grows a checkpoint tensor by tensor from the same parts.

Modules: `spec` (the canonical model), `errors`, `target_rules` (what every target must
satisfy), `layer_placement` and `index_maps` (where old blocks and indices go), `mup_reparam`,
`plan` (GrowthPlan), `grown_tensors` (building tensors from a plan), `moments` (Adam's
moments), `init`, `masks`, and one module per operator.
"""
from . import clone, msg, stack, zero
from .errors import GrowthError
from .grown_tensors import iter_grown
from .masks import MaskState
from .moments import iter_moments
from .operator import GrowthOperator
from .plan import GrowthPlan
from .spec import ModelSpec, count_parameters, parameter_axes

OPERATORS: dict[str, GrowthOperator] = {m.OPERATOR.name: m.OPERATOR for m in (msg, zero, clone, stack)}


def get_operator(name: str) -> GrowthOperator:
    if name not in OPERATORS:
        raise GrowthError("operator", f"unknown growth operator {name!r}; "
                                      f"allowed: {', '.join(OPERATORS)}")
    return OPERATORS[name]


__all__ = ["GrowthError", "GrowthOperator", "GrowthPlan", "MaskState", "ModelSpec", "OPERATORS",
           "count_parameters", "get_operator", "iter_grown", "iter_moments", "parameter_axes"]
