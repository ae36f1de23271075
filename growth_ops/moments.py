"""Adam's moments across a growth: one rule for every operator, read off the plan."""
from __future__ import annotations

from typing import Collection, Iterator

import torch

from .errors import GrowthError
from .grown_tensors import GetOld, place, read_old
from .plan import GrowthPlan
from .spec import axis_size, parameter_axes

MOMENT_RULES = ("keep", "staged")


def moment_power(kind: str) -> int:
    """exp_avg follows the gradient (power 1), exp_avg_sq its square (power 2)."""
    if kind not in ("exp_avg", "exp_avg_sq"):
        raise GrowthError("moments", f"unknown optimizer moment {kind!r}; allowed: exp_avg, exp_avg_sq")
    return 2 if kind == "exp_avg_sq" else 1


def iter_moments(plan: GrowthPlan, get_old: GetOld, kind: str,
                 names: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Adam moments of the grown model. Entries copied from old ones carry the old moment
    (rule `keep`: unchanged; rule `staged`: rescaled to the grown model's gradient units,
    m * s and v * s^2 with s = `gradient_scale`, which is Staged Training's m/2, v/4 for a
    x2 clone); new entries start at zero. The optimizer step count carries over unchanged.
    muP's reparametrization (`mup_reparam`: an entry times r) divides the gradient by r, so
    its moments always get m / r and v / r^2: Adam's normalised update is then the one the
    old moments gave, now in the new parametrization's units. Only `names`, if given."""
    power = moment_power(kind)
    for name, kinds in parameter_axes(plan.new).items():
        if names is not None and name not in names:
            continue
        shape = tuple(axis_size(plan.new, k) for k in kinds)
        old = read_old(plan, name, kinds, get_old)
        out = torch.zeros(shape, dtype=old.dtype if old is not None else torch.float32)
        if old is not None:
            factor = plan.gradient_scale(name, kinds) ** power if plan.moments_rule == "staged" else 1.0
            factor /= plan.reparam.get(name, 1.0) ** power
            out = place(out, old, kinds, plan.axes, factor)
        yield name, out


def grow_moments_with(plan: GrowthPlan, moments: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    return dict(iter_moments(plan, moments.get, kind))
