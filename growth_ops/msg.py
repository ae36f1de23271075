"""Masked Structural Growth (Yao et al., ICLR 2024) on the canonical state.

Grows hidden size, FFN size, query and kv heads (head dim fixed) and layers in one step.
Every old tensor entry is copied to its new position; new entries are random at the
model's init scale (`init: random`, breaking symmetry) or copies of old entries (`init:
copy`: width by cycling through old indices, a new block as a copy of the old block before
it), and switched off by masks that start at 0, so the grown model computes exactly the
old function until the masks ramp up. New blocks go last (`append`), spread evenly
(`interleave`) or at given positions ("1,3").
"""
from __future__ import annotations

import torch

from .common import (LAYER_INSERTS, MOMENT_RULES, GrowthError, GrowthPlan, all_axes,  # noqa: F401
                     check_choice, check_common, check_group, gather, grow_moments_with,
                     grow_state, layer_name, new_layer_positions, placement_axes, random_fill,
                     tiling_axes)
from .masks import MaskState
from .spec import FFN, HEADS, HIDDEN, ModelSpec

PRESERVES_FUNCTION = True
USES_MASKS = True
INITS = ("random", "copy")
DEFAULT_MOMENTS = "keep"

IndexMaps = GrowthPlan  # the former name


def check_growth(old: ModelSpec, new: ModelSpec, layer_insert="append", init: str | None = None,
                 moments: str | None = None) -> None:
    check_common(old, new)
    check_group(old, new)
    new_layer_positions(layer_insert, old.layers, new.layers)
    check_choice("init", init or "random", INITS, "msg")
    check_choice("moments", moments or DEFAULT_MOMENTS, MOMENT_RULES, "msg")


def layer_sources(old_layers: int, new_layers: int, layer_insert) -> list[int]:
    src = [-1] * new_layers
    for i, j in enumerate(new_layer_positions(layer_insert, old_layers, new_layers)):
        src[j] = i
    return src


def index_maps(old: ModelSpec, new: ModelSpec, layer_insert="append", init: str | None = None,
               moments: str | None = None) -> GrowthPlan:
    return GrowthPlan(old, new, placement_axes(old, new), layer_sources(old.layers, new.layers, layer_insert),
                      moments_rule=moments or DEFAULT_MOMENTS, init=init or "random")


def copy_fill(plan: GrowthPlan, name: str, shape: tuple, get_old, generator) -> torch.Tensor:
    """New entries copied from old ones: a new block from the nearest old block before it
    (the first old block if none), new width indices cycling through the old indices."""
    i, rest = layer_name(name)
    if name == "alibi_slopes":
        return random_fill(plan, name, shape, get_old, generator)
    if i is None:
        src = name
    else:
        before = [s for s in plan.layer_src[: i + 1] if s >= 0]
        src = f"layers.{before[-1] if before else 0}.{rest}"
    return gather(get_old(src), all_axes(plan.new)[name], tiling_axes(plan.old, plan.new)).clone()


def grow(state: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec, *, ramp_steps: int = 0,
         layer_insert="append", generator: torch.Generator | None = None, init: str | None = None,
         moments: str | None = None) -> tuple[dict[str, torch.Tensor], MaskState, GrowthPlan]:
    """The grown state, the masks that keep it equal to the old function, and the plan
    (for carrying optimizer moments)."""
    check_growth(old, new, layer_insert, init, moments)
    plan = index_maps(old, new, layer_insert, init, moments)
    grown = grow_state(plan, fill_for(plan), state, generator)
    return grown, masks_for(plan, ramp_steps), plan


def fill_for(plan: GrowthPlan):
    return copy_fill if plan.init == "copy" else random_fill


def fill(plan: GrowthPlan, name: str, shape: tuple, get_old, generator) -> torch.Tensor:
    return fill_for(plan)(plan, name, shape, get_old, generator)


plan_growth = index_maps
finish = None


def masks_for(plan: GrowthPlan, ramp_steps: int) -> MaskState:
    return MaskState(ramp_steps=ramp_steps, hidden_new=plan.new_indices(HIDDEN),
                     ffn_new=plan.new_indices(FFN), heads_new=plan.new_indices(HEADS),
                     layers_new=plan.new_layers)


def grow_moments(moments: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec,
                 maps: GrowthPlan, kind: str = "exp_avg") -> dict[str, torch.Tensor]:
    """Adam moments: copied for old coordinates, zero for new ones (for MSG the `staged`
    rule is the same: no old entry is scaled or tiled)."""
    return grow_moments_with(maps, moments, kind)
