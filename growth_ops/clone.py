"""`clone`: HyperCloning-style exact width growth by integer factors.

Every new index copies an old one (hidden, FFN, heads and kv heads tiled by their factors;
a query head's copy reads the copy of its own kv head, so the group size may grow by an
integer factor too). Input-side weights are divided by the factor of their input axis, so
each copy computes exactly the old value: x' = tile(x). Norms see the same statistics over
a tiled vector, eps included.

Tied embeddings: the embedding is tiled (not divided: it writes the residual), so the tied
head would give n x the logits; the final norm's gain (and bias) is divided by n instead.
New blocks (if layers grow) are exact identities: zero o and down projections.

Moments (default rule `staged`): a copy's gradient is the old gradient / (copies x scale),
so copies get m * s and v * s^2 (s = 1/n for most tensors: Staged Training's m/2, v/4 at
x2). Adam then makes each copy's first update equal the old entry's update, so the copies
keep moving together as the old entry would: the grown model continues the old training
trajectory (per coordinate) instead of seeing its second moments n^2 too large.
"""
from __future__ import annotations

import torch

from .errors import GrowthError
from .index_maps import tiling_axes
from .layer_placement import layer_sources
from .operator import GrowthOperator
from .plan import GrowthPlan
from .spec import FFN, HEADS, HIDDEN, KV, Q, ModelSpec
from .zero import OPERATOR as ZERO

INITS = ("copy",)
DEFAULT_MOMENTS = "staged"


def factors(old: ModelSpec, new: ModelSpec) -> dict[str, int]:
    return {f: getattr(new, f) // getattr(old, f) for f in ("hidden", "ffn", "heads", "kv_heads")}


class Clone(GrowthOperator):
    name = "clone"
    preserves_function = True
    inits = INITS
    default_moments = DEFAULT_MOMENTS

    def check_target(self, old, new):
        for f in ("hidden", "ffn", "heads", "kv_heads"):
            a, b = getattr(old, f), getattr(new, f)
            if b % a:
                raise GrowthError(f, f"clone tiles by integer factors: {b} is not a multiple of {a}; "
                                     f"allowed: {', '.join(str(a * k) for k in range(1, 5))}, ...")
        n = factors(old, new)
        if n["heads"] % n["kv_heads"]:
            allowed = [old.kv_heads * d for d in range(1, n["heads"] + 1) if n["heads"] % d == 0]
            raise GrowthError("kv_heads", f"clone needs the heads factor ({n['heads']}) to be a multiple of "
                                          f"the kv_heads factor ({n['kv_heads']}) so every query head keeps "
                                          f"a copy of its kv head; allowed: {', '.join(map(str, allowed))}")

    def build_plan(self, old, new, options):
        n = factors(old, new)
        scales = {"attn.q.weight": 1 / n["hidden"], "attn.k.weight": 1 / n["hidden"],
                  "attn.v.weight": 1 / n["hidden"], "mlp.up.weight": 1 / n["hidden"],
                  "mlp.gate.weight": 1 / n["hidden"], "attn.o.weight": 1 / n["heads"],
                  "mlp.down.weight": 1 / n["ffn"], "head.weight": 1 / n["hidden"]}
        if new.tie_embeddings:
            scales["final_norm.weight"] = scales["final_norm.bias"] = 1 / n["hidden"]
        copies = {HIDDEN: n["hidden"], FFN: n["ffn"], HEADS: n["heads"], Q: n["heads"], KV: n["kv_heads"]}
        return GrowthPlan(old, new, tiling_axes(old, new),
                          layer_sources(old.layers, new.layers, options.layer_insert),
                          copies=copies, scales=scales, moments_rule=options.moments, init="copy")

    def fill(self, plan, name, shape, get_old, generator):
        """Only new blocks need filling: identities (zero output projections, unit norms)."""
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        return ZERO.fill(plan, name, shape, get_old, generator)


OPERATOR = Clone()
