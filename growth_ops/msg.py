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

from .errors import GrowthError
from .grown_tensors import GetOld, all_axes, gather, random_fill
from .index_maps import expand_heads, placement_axes, tiling_axes
from .layer_placement import layer_name, layer_sources
from .masks import MaskState
from .operator import GrowthOperator
from .plan import GrowthPlan
from .spec import FFN, HEADS, HIDDEN, KV, Q, VOCAB, ModelSpec
from .target_rules import check_group

INITS = ("random", "copy")
DEFAULT_MOMENTS = "keep"
# The masks must start below 1 for the grown model to compute the old function: a ramp of
# 0 steps would put the new random weights live at once. 40 is conf/growth/msg.yaml's.
MIN_RAMP_STEPS = 1
DEFAULT_RAMP_STEPS = 40


def copy_fill(plan: GrowthPlan, name: str, shape: tuple, get_old: GetOld,
              generator: torch.Generator | None) -> torch.Tensor:
    """A `Fill`: new entries copied from old ones: a new block from the nearest old block
    before it (the first old block if none), new width indices cycling through the old
    indices."""
    i, rest = layer_name(name)
    if name == "alibi_slopes":
        return random_fill(plan, name, shape, get_old, generator)
    if i is None:
        src = name
    else:
        before = [s for s in plan.layer_src[: i + 1] if s >= 0]
        src = f"layers.{before[-1] if before else 0}.{rest}"
    return gather(get_old(src), all_axes(plan.new)[name], tiling_axes(plan.old, plan.new)).clone()


def unmasked_plan(spec: ModelSpec, masks: MaskState) -> GrowthPlan:
    """The plan that takes out everything `masks` covers (new hidden coordinates, FFN
    neurons, query heads, blocks, and the kv heads only new query heads use): applied with
    `iter_grown`, it gives the model before growth, whose function is the grown model's at
    mask 0 exactly. Old query heads keep their order, so they land on their kv heads."""
    def keep(size: int, new: list[int]) -> torch.Tensor:
        gone = set(new)
        return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)

    heads = keep(spec.heads, masks.heads_new)
    kv_of = heads // spec.group_size  # the kv head each kept query head reads
    kv = torch.unique(kv_of)
    group = len(heads) // len(kv)
    if len(heads) % len(kv) or not torch.equal(kv_of, kv.repeat_interleave(group)):
        raise GrowthError("masks", "the masked query heads do not leave whole kv groups; the new structure "
                                   "cannot be taken out")
    hidden, ffn = keep(spec.hidden, masks.hidden_new), keep(spec.ffn, masks.ffn_new)
    layer_src = [j for j in range(spec.layers) if j not in set(masks.layers_new)]
    old = spec.with_shape(layers=len(layer_src), hidden=len(hidden), ffn=len(ffn), heads=len(heads),
                          kv_heads=len(kv))
    axes = {HIDDEN: hidden, FFN: ffn, HEADS: heads, Q: expand_heads(heads, spec.head_dim),
            KV: expand_heads(kv, spec.head_dim), VOCAB: torch.arange(spec.vocab)}
    return GrowthPlan(spec, old, axes, layer_src)


# Adam moments: copied for old coordinates, zero for new ones (the `staged` rule is the same
# here: no old entry is scaled or tiled).
class Msg(GrowthOperator):
    name = "msg"
    preserves_function = True
    inits = INITS
    default_moments = DEFAULT_MOMENTS
    uses_masks = True
    min_ramp_steps = MIN_RAMP_STEPS
    default_ramp_steps = DEFAULT_RAMP_STEPS

    def check_target(self, old, new):
        check_group(old, new)

    def build_plan(self, old, new, options):
        return GrowthPlan(old, new, placement_axes(old, new), layer_sources(old.layers, new.layers, options.layer_insert),
                          moments_rule=options.moments, init=options.init)

    def fill(self, plan, name, shape, get_old, generator):
        return (copy_fill if plan.init == "copy" else random_fill)(plan, name, shape, get_old, generator)

    def masks(self, plan, ramp_steps):
        return MaskState(ramp_steps=ramp_steps, hidden_new=plan.new_indices(HIDDEN),
                         ffn_new=plan.new_indices(FFN), heads_new=plan.new_indices(HEADS),
                         layers_new=plan.new_layers)


OPERATOR = Msg()
# module-level names of the operator's calls, which callers (tests) use
check_growth, plan_growth = OPERATOR.check, OPERATOR.plan
