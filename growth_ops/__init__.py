"""Growth operators on the canonical model state. Depends on torch only: no engine,
Hydra or MLflow. An operator module provides `grow`, `grow_moments`, `check_growth`
and `PRESERVES_FUNCTION`."""
from types import ModuleType

from . import msg
from .masks import MaskState
from .msg import GrowthError
from .spec import ModelSpec, count_parameters, parameter_axes

OPERATORS: dict[str, ModuleType] = {"msg": msg}


def get_operator(name: str) -> ModuleType:
    if name not in OPERATORS:
        raise GrowthError("operator", f"unknown growth operator {name!r}; "
                                      f"allowed: {', '.join(OPERATORS)}")
    return OPERATORS[name]


__all__ = ["GrowthError", "MaskState", "ModelSpec", "OPERATORS", "count_parameters",
           "get_operator", "parameter_axes"]
