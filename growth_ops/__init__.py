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
import importlib

from .errors import GrowthError
from .spec import ModelSpec, count_parameters, parameter_axes

# The rest needs torch: imported on first use, so a process that needs only the spec (a
# `grow prepare` worker, through the config schema) does not load torch.
_LAZY = {"iter_grown": "grown_tensors", "MaskState": "masks", "iter_moments": "moments",
         "GrowthOperator": "operator", "GrowthPlan": "plan"}
_OPERATOR_MODULES = ("msg", "zero", "clone", "stack", "upcycle", "drop_upcycle")


def operators() -> dict:
    """name -> GrowthOperator, in the order msg, zero, clone, stack, upcycle, drop_upcycle."""
    mods = [importlib.import_module(f"{__name__}.{m}") for m in _OPERATOR_MODULES]
    return {m.OPERATOR.name: m.OPERATOR for m in mods}


def get_operator(name: str):
    ops = operators()
    if name not in ops:
        raise GrowthError("operator", f"unknown growth operator {name!r}; "
                                      f"allowed: {', '.join(ops)}")
    return ops[name]


def __getattr__(name: str):
    if name == "OPERATORS":
        return operators()
    if name in _OPERATOR_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GrowthError", "GrowthOperator", "GrowthPlan", "MaskState", "ModelSpec", "OPERATORS",
           "count_parameters", "get_operator", "iter_grown", "iter_moments", "parameter_axes"]
