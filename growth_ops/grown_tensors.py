"""Building grown tensors from a plan: one builder for every operator, in memory
(`grow_state`) or tensor by tensor from disk (`iter_grown`)."""
from __future__ import annotations

import hashlib
from typing import Callable, Collection, Iterator

import torch

from .init import init_tensor
from .plan import GrowthPlan
from .spec import ModelSpec, axis_size, buffer_axes, parameter_axes

# The signatures of an operator's parts that build tensors (growth_ops.operator.GrowthOperator
# implements them as its `fill` and `finish` methods):
GetOld = Callable[[str], "torch.Tensor | None"]  # an old tensor by name (None: absent)
# fill(plan, name, shape, get_old, generator) -> the new entries of a grown tensor, at its new shape
Fill = Callable[[GrowthPlan, str, tuple, GetOld, "torch.Generator | None"], torch.Tensor]
# finish(plan, name, tensor) -> the grown tensor after a last pass
Finish = Callable[[GrowthPlan, str, torch.Tensor], torch.Tensor]


def all_axes(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    return {**parameter_axes(spec), **buffer_axes(spec)}


def gather(old: torch.Tensor, kinds: tuple[str, ...], axes: dict[str, torch.Tensor]) -> torch.Tensor:
    """old[src_0, src_1] for index maps without -1."""
    out = old
    for dim, kind in enumerate(kinds):
        out = out.index_select(dim, axes[kind])
    return out


def place(out: torch.Tensor, old: torch.Tensor, kinds: tuple[str, ...],
          axes: dict[str, torch.Tensor], factor: float = 1.0) -> torch.Tensor:
    """out[j...] = factor * old[src(j)...] wherever every axis of j has a source."""
    srcs = [axes[k] for k in kinds]
    if all(bool((s >= 0).all()) for s in srcs):
        vals = gather(old, kinds, axes).to(old.dtype if out is None else out.dtype)
        return vals * factor if factor != 1.0 else vals
    sel = [torch.nonzero(s >= 0).flatten() for s in srcs]
    vals = old.to(out.dtype)
    if factor != 1.0:
        vals = vals * factor
    if all(torch.equal(s[i], torch.arange(len(i))) and torch.equal(i, torch.arange(len(i)))
           for s, i in zip(srcs, sel)):  # old entries keep their place: a plain slice copy
        out[tuple(slice(0, len(i)) for i in sel)] = vals
        return out
    n = len(kinds)  # index grids broadcast over the tensor's dims (torch's ix_)
    grid = [i.view([-1 if d == a else 1 for d in range(n)]) for a, i in enumerate(sel)]
    src_grid = [s[i].view([-1 if d == a else 1 for d in range(n)]) for a, (s, i) in enumerate(zip(srcs, sel))]
    out[tuple(grid)] = vals[tuple(src_grid)]
    return out


def read_old(plan: GrowthPlan, name: str, kinds: tuple[str, ...], get_old: GetOld) -> torch.Tensor | None:
    """The old tensor `name`'s copied entries come from, or None (a new tensor). A dense FFN
    tensor read for an expert tensor (`upcycle`) is one expert: it gains the expert axis."""
    src = plan.source(name)
    old = get_old(src) if src is not None else None
    if old is not None and old.dim() == len(kinds) - 1:
        old = old.unsqueeze(0)
    return old


def fully_copied(plan: GrowthPlan, name: str, kinds: tuple[str, ...]) -> bool:
    return plan.source(name) is not None and all(bool((plan.axes[k] >= 0).all()) for k in kinds)


def tensor_generator(generator: torch.Generator | None, name: str) -> torch.Generator | None:
    """The random stream of one grown tensor, seeded by the growth's seed and the tensor's
    name: a tensor's new entries are the same whichever rank grows it, in whatever order,
    and whichever other tensors are grown, so the growth can be split over ranks (any
    layout) and still give the same bits as growing the whole state in one process."""
    if generator is None:
        return None
    digest = hashlib.sha256(f"{generator.initial_seed()}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def iter_grown(plan: GrowthPlan, fill: Fill, get_old: GetOld, generator: torch.Generator | None = None,
               finish: Finish | None = None,
               names: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, grown tensor) in canonical order (only `names`, if given), reading only
    the old tensors each one needs through `get_old`: memory stays at a few tensors, so a
    checkpoint can be grown from disk, and a share of it by each rank. `finish(plan, name,
    tensor)` lets an operator adjust a built tensor."""
    for name, kinds in all_axes(plan.new).items():
        if names is not None and name not in names:
            continue
        shape = tuple(axis_size(plan.new, k) for k in kinds)
        old = read_old(plan, name, kinds, get_old)
        if old is not None and fully_copied(plan, name, kinds):
            out = place(None, old, kinds, plan.axes, plan.copy_factor(name))
        else:
            out = fill(plan, name, shape, get_old, tensor_generator(generator, name))
            if old is not None:
                out = place(out.to(old.dtype), old, kinds, plan.axes, plan.copy_factor(name))
        if finish is not None:
            out = finish(plan, name, out)
        yield name, out


def grow_state(plan: GrowthPlan, fill: Fill, state: dict[str, torch.Tensor],
               generator: torch.Generator | None = None, finish: Finish | None = None) -> dict[str, torch.Tensor]:
    return dict(iter_grown(plan, fill, state.get, generator, finish))


def random_fill(plan: GrowthPlan, name: str, shape: tuple, get_old: GetOld,
                generator: torch.Generator | None) -> torch.Tensor:
    """A `Fill`: new entries at the grown model's own init scale (ALiBi: slopes of the new
    head count)."""
    return init_tensor(name, shape, plan.new, generator)
