"""`upcycle` and `drop_upcycle`: a dense FFN becomes a mixture of experts.

Sparse upcycling (Komatsuzaki et al., 2023; Megatron-LM's --moe-use-upcycling): every
expert is a copy of the block's dense FFN and the router is new (small random weights, the
model's init). The router's top-k weights are renormalised to sum 1, so identical experts
give exactly the dense output whatever the routing: the function is preserved, and the
runner checks it like msg/zero/clone. Adam's moments of the dense FFN are copied to every
expert; the router's start at zero.

Width and depth may grow in the same transition: the dense part grows by `growth.init`'s
rule, that of `zero` (any shape) or `clone` (integer factors), and every expert is then a
copy of the grown dense FFN (with new FFN entries identical across experts too).

`drop_upcycle` (Drop-Upcycling, Nakamura et al., ICLR 2025) then re-initialises a fraction
(`drop_ratio`, 0.5 by default) of each expert's intermediate dims: the same random dims in
its up, gate and down, drawn from a normal with the dense tensor's mean and std. Experts
then differ from the start (faster specialisation); the function changes, so the loss
change is reported, not checked (like stack).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .clone import OPERATOR as CLONE
from .errors import GrowthError
from .grown_tensors import random_fill
from .layer_placement import layer_name
from .operator import GrowthOperator, GrowthOptions
from .plan import GrowthPlan
from .spec import EXPERTS, ModelSpec, dense_name, is_expert_tensor, is_router
from .zero import OPERATOR as ZERO

BASES = {"zero": ZERO, "clone": CLONE}  # growth.init: the rule of the dense part's growth
DEFAULT_DROP_RATIO = 0.5


@dataclass
class UpcyclePlan(GrowthPlan):
    """The dense growth's plan (`base`'s) towards the new shape, plus the expert axis: every
    expert's tensors come from the old block's dense ones; the router is new."""

    base: str = "zero"
    drop_ratio: float = 0.0

    def source(self, name: str) -> str | None:
        return None if is_router(name) else super().source(dense_name(name))

    def scale(self, name: str) -> float:
        return super().scale(dense_name(name))


def _seed(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def drop_dims(tensor: torch.Tensor, name: str, ratio: float) -> torch.Tensor:
    """Re-initialise `ratio` of each expert's intermediate dims of an expert tensor
    [E, ffn, hidden] (up, gate) or [E, hidden, ffn] (down). The dims are drawn per (layer,
    expert), so up, gate and down drop the same ones; values from N(mean, std) of the
    expert's tensor (Drop-Upcycling's statistics of the original weight)."""
    layer, rel = layer_name(name)
    ffn_dim = 2 if rel.endswith("down.weight") else 1
    size = tensor.shape[ffn_dim]
    count = round(ratio * size)
    if not count:
        return tensor
    for e in range(tensor.shape[0]):
        dims = torch.randperm(size, generator=torch.Generator().manual_seed(_seed("drop", layer, e)))[:count]
        w = tensor[e]
        mean, std = float(w.float().mean()), float(w.float().std())
        g = torch.Generator().manual_seed(_seed("values", name, e))
        shape = (count, w.shape[1]) if ffn_dim == 1 else (w.shape[0], count)
        values = torch.empty(shape).normal_(mean, std, generator=g).to(w.dtype)
        if ffn_dim == 1:
            w[dims] = values
        else:
            w[:, dims] = values
    return tensor


class Upcycle(GrowthOperator):
    name = "upcycle"
    preserves_function = True
    upcycles = True
    inits = tuple(BASES)
    default_moments = ZERO.default_moments

    def options(self, layer_insert="append", init=None, moments=None, drop_ratio=None) -> GrowthOptions:
        init = init or self.inits[0]
        base = BASES.get(init)
        default_moments = base.default_moments if base is not None else self.default_moments
        return GrowthOptions(layer_insert, init, moments or default_moments, self.drop_ratio_of(drop_ratio))

    def check_target(self, old: ModelSpec, new: ModelSpec) -> None:
        pass  # the base's rules run in check_base, once the options are known

    def check_base(self, old: ModelSpec, new: ModelSpec, init: str | None) -> None:
        base = BASES.get(init or self.inits[0])
        if base is not None and old != new.dense():
            base.check_target(old, new.dense())

    def build_plan(self, old, new, options):
        base = BASES[options.init]
        dense = base.build_plan(old, new.dense(), options)
        axes = {**dense.axes, EXPERTS: torch.zeros(new.experts, dtype=torch.long)}  # all copy the dense FFN
        return UpcyclePlan(old, new, axes, dense.layer_src, copies=dense.copies, scales=dense.scales,
                           moments_rule=options.moments, init=options.init, reparam=dense.reparam,
                           base=options.init, drop_ratio=options.drop_ratio)

    def fill(self, plan, name, shape, get_old, generator):
        base = BASES[plan.base]
        if is_router(name):
            return random_fill(plan, name, shape, get_old, generator)
        if is_expert_tensor(name):  # one dense tensor grown by the base's rule, for every expert
            dense = base.fill(plan, dense_name(name), shape[1:], get_old, generator)
            return dense.unsqueeze(0).expand(shape).clone()
        return base.fill(plan, name, shape, get_old, generator)

    def finish(self, plan, name, tensor):
        base = BASES[plan.base]
        if not is_expert_tensor(name):
            return base.finish(plan, name, tensor)
        tensor = tensor.clone() if not tensor.is_contiguous() else tensor
        for e in range(tensor.shape[0]):
            tensor[e] = base.finish(plan, dense_name(name), tensor[e])
        if plan.drop_ratio:
            tensor = drop_dims(tensor, name, plan.drop_ratio)
        return tensor


class DropUpcycle(Upcycle):
    name = "drop_upcycle"
    preserves_function = False

    def drop_ratio_of(self, drop_ratio: float | None) -> float:
        ratio = DEFAULT_DROP_RATIO if drop_ratio is None else drop_ratio
        if not 0.0 <= ratio <= 1.0:
            raise GrowthError("drop_ratio", f"{ratio} is not a fraction of the experts' intermediate dims; "
                                            "allowed: 0 <= drop_ratio <= 1")
        return ratio


OPERATOR = Upcycle()
