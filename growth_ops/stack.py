"""`stack`: G_stack-style depth growth (Du et al. 2024), NOT function-preserving.

The grown model is the old block stack repeated g = layers'/layers times (`append`: the
whole stack g times, as G_stack; `interleave`: each block g times in a row). Width must not
change. Copied blocks carry their source block's Adam moments (rule `keep`; `staged` is the
same here: depth copies are not symmetric copies of one function, nothing is rescaled).
"""
from __future__ import annotations

from .errors import GrowthError
from .grown_tensors import random_fill
from .index_maps import placement_axes
from .layer_placement import LAYER_INSERTS
from .operator import GrowthOperator
from .plan import GrowthPlan

INITS = ("copy",)
DEFAULT_MOMENTS = "keep"


class Stack(GrowthOperator):
    name = "stack"
    preserves_function = False
    inits = INITS
    default_moments = DEFAULT_MOMENTS

    def check_target(self, old, new):
        for f in ("hidden", "ffn", "heads", "kv_heads"):
            if getattr(new, f) != getattr(old, f):
                raise GrowthError(f, f"stack grows depth only ({getattr(old, f)} -> {getattr(new, f)}); "
                                     f"allowed: {getattr(old, f)} (grow width with msg, zero or clone)")
        if new.layers % old.layers:
            raise GrowthError("layers", f"stack repeats the {old.layers} blocks a whole number of times; "
                                        f"{new.layers} is not a multiple; allowed: "
                                        f"{', '.join(str(old.layers * k) for k in range(1, 5))}, ...")

    def check_layer_insert(self, layer_insert, old, new):
        if layer_insert not in LAYER_INSERTS:  # whole copies of the stack: no explicit positions
            raise GrowthError("layer_insert", f"{layer_insert!r} is not supported by stack; "
                                              f"allowed: {', '.join(LAYER_INSERTS)}")

    def build_plan(self, old, new, options):
        g = new.layers // old.layers
        src = [j % old.layers for j in range(new.layers)] if options.layer_insert == "append" else \
            [j // g for j in range(new.layers)]
        return GrowthPlan(old, new, placement_axes(old, new), src, moments_rule=options.moments, init="copy")

    def fill(self, plan, name, shape, get_old, generator):
        # never used: every entry of a stacked model is a copy
        return random_fill(plan, name, shape, get_old, generator)


OPERATOR = Stack()
