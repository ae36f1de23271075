"""`zero`: exact growth without masks.

New output-side weights (o-proj columns of new heads, down-proj columns of new neurons,
whole o/down of new blocks) are zero and input-side weights random, so new structure adds
nothing until it trains. Width: the residual stream is scaled by c = sqrt(D'/D) (embedding
and the old o/down rows times c, norm gains divided by c), so a norm over the wider hidden
sees exactly the old statistics, eps included:
- RMSNorm: new residual coordinates are zero, so mean(x'^2) = c^2 mean(x^2) D/D' = mean(x^2);
- LayerNorm: every writer into the residual writes the mean of its old rows into the new
  coordinates, so they hold the old mean: the mean is unchanged and so is the variance.
Tied embeddings: the head reads the c-scaled embedding, so the final norm's gain (and bias)
is divided by c once more. New blocks are exact identities (zero o and down projections).
"""
from __future__ import annotations

import math

import torch

from .grown_tensors import random_fill
from .index_maps import placement_axes
from .layer_placement import layer_name, layer_sources
from .operator import GrowthOperator
from .plan import GrowthPlan
from .spec import HIDDEN, is_norm
from .target_rules import check_group

INITS = ("random",)
DEFAULT_MOMENTS = "keep"
WRITERS = ("attn.o.weight", "mlp.down.weight")  # into the residual stream (hidden on axis 0)


# `keep`: old entries' moments as they were, new zero. `staged`: rescaled by the gradient
# change the c-scaling causes (m / a, v / a^2 for an entry scaled by a).
class Zero(GrowthOperator):
    name = "zero"
    preserves_function = True
    inits = INITS
    default_moments = DEFAULT_MOMENTS

    def check_target(self, old, new):
        check_group(old, new)

    def build_plan(self, old, new, options):
        c = math.sqrt(new.hidden / old.hidden)
        scales = {"embed.weight": c, "attn.o.weight": c, "mlp.down.weight": c,
                  "attn_norm.weight": 1 / c, "mlp_norm.weight": 1 / c,
                  "final_norm.weight": 1 / (c * c) if new.tie_embeddings else 1 / c}
        if new.tie_embeddings:
            scales["final_norm.bias"] = 1 / c
        return GrowthPlan(old, new, placement_axes(old, new),
                          layer_sources(old.layers, new.layers, options.layer_insert),
                          scales=scales, moments_rule=options.moments, init="random")

    def fill(self, plan, name, shape, get_old, generator):
        rest = layer_name(name)[1]
        if is_norm(name):  # gains at the scaled stream's level; biases zero (new outputs stay 0)
            return torch.full(shape, plan.scale(name)) if name.endswith("weight") else torch.zeros(shape)
        if rest in WRITERS or name == "embed.weight":
            return torch.zeros(shape)  # output side: new structure writes nothing yet
        return random_fill(plan, name, shape, get_old, generator)

    def finish(self, plan, name, tensor):
        """LayerNorm: new residual coordinates receive the mean of the old ones."""
        if plan.new.norm != "layernorm" or plan.new.hidden == plan.old.hidden:
            return tensor
        old, new = plan.axes[HIDDEN] >= 0, plan.axes[HIDDEN] < 0
        if name == "embed.weight":
            tensor[:, new] = tensor[:, old].mean(1, keepdim=True)
        elif layer_name(name)[1] in WRITERS:
            tensor[new] = tensor[old].mean(0, keepdim=True)
        return tensor


OPERATOR = Zero()
