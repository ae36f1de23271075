"""`stack`: G_stack-style depth growth (Du et al. 2024), NOT function-preserving.

The grown model is the old block stack repeated g = layers'/layers times (`append`: the
whole stack g times, as G_stack; `interleave`: each block g times in a row). Width must not
change. Copied blocks carry their source block's Adam moments (rule `keep`; `staged` is the
same here: depth copies are not symmetric copies of one function, nothing is rescaled).
"""
from __future__ import annotations


from .common import (LAYER_INSERTS, MOMENT_RULES, GrowthError, GrowthPlan, check_choice,
                     check_common, placement_axes, random_fill)
from .operator import GrowthOperator
from .spec import ModelSpec

INITS = ("copy",)
DEFAULT_MOMENTS = "keep"


def check_growth(old: ModelSpec, new: ModelSpec, layer_insert="append", init: str | None = None,
                 moments: str | None = None) -> None:
    check_common(old, new)
    for f in ("hidden", "ffn", "heads", "kv_heads"):
        if getattr(new, f) != getattr(old, f):
            raise GrowthError(f, f"stack grows depth only ({getattr(old, f)} -> {getattr(new, f)}); "
                                 f"allowed: {getattr(old, f)} (grow width with msg, zero or clone)")
    if new.layers % old.layers:
        raise GrowthError("layers", f"stack repeats the {old.layers} blocks a whole number of times; "
                                    f"{new.layers} is not a multiple; allowed: "
                                    f"{', '.join(str(old.layers * k) for k in range(1, 5))}, ...")
    if layer_insert not in LAYER_INSERTS:
        raise GrowthError("layer_insert", f"{layer_insert!r} is not supported by stack; "
                                          f"allowed: {', '.join(LAYER_INSERTS)}")
    check_choice("init", init or "copy", INITS, "stack")
    check_choice("moments", moments or DEFAULT_MOMENTS, MOMENT_RULES, "stack")


def plan_growth(old: ModelSpec, new: ModelSpec, layer_insert="append", init: str | None = None,
                moments: str | None = None) -> GrowthPlan:
    g = new.layers // old.layers
    src = [j % old.layers for j in range(new.layers)] if layer_insert == "append" else \
        [j // g for j in range(new.layers)]
    return GrowthPlan(old, new, placement_axes(old, new), src, moments_rule=moments or DEFAULT_MOMENTS,
                      init="copy")


# fill: never used, every entry of a stacked model is a copy
OPERATOR = GrowthOperator("stack", preserves_function=False, inits=INITS, default_moments=DEFAULT_MOMENTS,
                          check=check_growth, plan=plan_growth, fill=random_fill)
