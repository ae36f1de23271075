"""What every growth operator shares: target validation, the growth plan, the per-tensor
builder and the optimizer-moment rules.

A `GrowthPlan` says, for every axis kind, which old index each new index comes from (-1:
a new index), which old block each new block comes from (-1: a new block), and by how much
copied entries are scaled. Operators differ only in the plan and in how they fill new
entries, so one builder serves all of them, in memory or tensor by tensor from disk
(`iter_grown`), and one rule carries Adam's moments for all of them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

import torch

from .init import init_tensor
from .spec import (ARCHITECTURE, FFN, HEADS, HIDDEN, INPUT_SCALE, KV, PARAMETRIZATION, Q, VOCAB, ModelSpec,
                   axis_size, buffer_axes, parameter_axes)

ARCH_FIELDS = (*ARCHITECTURE, *PARAMETRIZATION, "vocab")
SHAPE_FIELDS = ("layers", "hidden", "ffn", "heads", "kv_heads")
LAYER_INSERTS = ("append", "interleave")
MOMENT_RULES = ("keep", "staged")


class GrowthError(ValueError):
    """An impossible growth target; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# -- validation --------------------------------------------------------------------------

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_common(old: ModelSpec, new: ModelSpec) -> None:
    """Rules of every operator: same architecture, no shrinking, fixed head dim, kv heads
    dividing heads."""
    for f in ARCH_FIELDS:
        a, b = getattr(old, f), getattr(new, f)
        if a != b:
            raise GrowthError(f, f"growth cannot change the architecture ({a!r} -> {b!r}); allowed: {a!r}")
    for f in SHAPE_FIELDS:
        a, b = getattr(old, f), getattr(new, f)
        if b < a:
            raise GrowthError(f, f"cannot shrink ({a} -> {b}); allowed: >= {a}")
    if new.head_dim != old.head_dim:
        raise GrowthError("head_dim", f"must stay {old.head_dim}: growth adds heads, it never "
                                      f"changes the head dimension; allowed: {old.head_dim}")
    if new.heads % new.kv_heads:
        raise GrowthError("kv_heads", f"{new.kv_heads} does not divide heads={new.heads}; "
                                      f"allowed: {', '.join(map(str, divisors(new.heads)))}")


def check_group(old: ModelSpec, new: ModelSpec) -> None:
    """Placement operators keep every old query head on its kv head: the group size may grow."""
    if new.group_size < old.group_size:
        allowed = [k for k in divisors(new.heads) if new.heads // k >= old.group_size and k >= old.kv_heads]
        raise GrowthError("kv_heads", f"query heads per kv head cannot fall ({old.group_size} -> "
                                      f"{new.group_size}): old query heads must keep their kv head; "
                                      f"allowed: {', '.join(map(str, allowed)) or 'none'}")


def check_choice(field_: str, value, allowed: tuple[str, ...], op: str) -> None:
    if value not in allowed:
        raise GrowthError(field_, f"{value!r} is not supported by {op}; allowed: {', '.join(allowed)}")


def new_layer_positions(layer_insert, old_layers: int, new_layers: int) -> list[int]:
    """New position of each old block. `append` puts new blocks last; `interleave` spreads
    them evenly, each after an old block; explicit positions ("1,3" or a list) name the
    positions of the new blocks in the grown stack."""
    added = new_layers - old_layers
    if isinstance(layer_insert, str) and layer_insert in LAYER_INSERTS:
        if layer_insert == "append" or added == 0:
            return list(range(old_layers))
        return [i + (i * added) // old_layers for i in range(old_layers)]
    try:
        items = layer_insert.replace(";", ",").split(",") if isinstance(layer_insert, str) else layer_insert
        spots = [int(p) for p in items if str(p).strip() != ""]
    except (TypeError, ValueError, AttributeError):
        raise GrowthError("layer_insert", f"{layer_insert!r} is not allowed; allowed: "
                                          f"{', '.join(LAYER_INSERTS)}, or the positions of the new "
                                          "blocks as 'i,j,...'") from None
    if len(spots) != added or len(set(spots)) != added or any(not 0 <= p < new_layers for p in spots):
        raise GrowthError("layer_insert", f"positions {spots} must be {added} distinct new-block "
                                          f"positions in 0..{new_layers - 1}")
    return [p for p in range(new_layers) if p not in set(spots)]


# -- muP across a change of width ---------------------------------------------------------

def mup_reparam(old: ModelSpec, new: ModelSpec) -> dict[str, float]:
    """Factors on copied entries that keep the function when the width multiplier changes
    (muP only): the logits' factor output_mult / m becomes output_mult / m', so the readout
    matrix is multiplied by r = m'/m, and with tied embeddings the recorded input scale is
    divided by r (see growth_ops.spec.INPUT_SCALE). These change the parametrization, not
    the function: Adam's moments follow the gradient's change whatever the moment rule
    (`iter_moments`). New entries keep their init (the readout's base scale)."""
    if not new.is_mup or new.hidden == old.hidden:
        return {}
    r = new.hidden / old.hidden
    if new.tie_embeddings:
        return {"embed.weight": r, INPUT_SCALE: 1.0 / r}
    return {"head.weight": r}


# -- the plan ----------------------------------------------------------------------------

def layer_sources(old_layers: int, new_layers: int, layer_insert) -> list[int]:
    src = [-1] * new_layers
    for i, j in enumerate(new_layer_positions(layer_insert, old_layers, new_layers)):
        src[j] = i
    return src


def layer_name(name: str) -> tuple[int | None, str]:
    """'layers.3.attn.q.weight' -> (3, 'attn.q.weight'); other names -> (None, name)."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return int(i), rest
    return None, name


@dataclass
class GrowthPlan:
    old: ModelSpec
    new: ModelSpec
    axes: dict[str, torch.Tensor]  # kind -> old index of each new index, -1 where new
    layer_src: list[int]  # new block -> old block it copies, -1 where new
    copies: dict[str, int] = field(default_factory=dict)  # kind -> copies of each old index (tiling)
    scales: dict[str, float] = field(default_factory=dict)  # generic name -> factor on copied entries
    moments_rule: str = "keep"
    init: str = "random"
    reparam: dict[str, float] | None = None  # name -> muP factor on copied entries; None: from the specs

    def __post_init__(self):
        if self.reparam is None:
            self.reparam = mup_reparam(self.old, self.new)

    @property
    def layers(self) -> list[int]:
        """Old block -> its (first) new position."""
        first: dict[int, int] = {}
        for j, i in enumerate(self.layer_src):
            if i >= 0:
                first.setdefault(i, j)
        return [first[i] for i in range(self.old.layers)]

    def new_indices(self, kind: str, new_size: int | None = None) -> list[int]:
        return torch.nonzero(self.axes[kind] < 0).flatten().tolist()

    @property
    def new_layers(self) -> list[int]:
        return [j for j, i in enumerate(self.layer_src) if i < 0]

    def source(self, name: str) -> str | None:
        """The old tensor a new tensor takes its copied entries from (None: a new block)."""
        i, rest = layer_name(name)
        if i is None:
            return name
        src = self.layer_src[i]
        return None if src < 0 else f"layers.{src}.{rest}"

    def scale(self, name: str) -> float:
        """The operator's factor on copied entries of `name`."""
        return self.scales.get(layer_name(name)[1], 1.0)

    def copy_factor(self, name: str) -> float:
        """Everything copied entries of `name` are multiplied by: the operator's scale and muP's."""
        return self.scale(name) * self.reparam.get(name, 1.0)

    def gradient_scale(self, name: str, kinds: tuple[str, ...]) -> float:
        """How the loss gradient of a copied entry compares with the old entry's: if the new
        model equals the old one with each entry copied `k` times and scaled by `a`, symmetry
        gives grad' = grad / (k * a)."""
        k = 1
        for kind in kinds:
            k *= self.copies.get(kind, 1)
        return 1.0 / (k * self.scale(name))


def placement_axes(old: ModelSpec, new: ModelSpec) -> dict[str, torch.Tensor]:
    """Old indices keep their place and new ones follow, except query heads: old head h of
    kv group h // g moves to (h // g) * g' + h % g, so it stays in its group as g grows."""
    g_old, g_new = old.group_size, new.group_size
    heads = torch.full((new.heads,), -1, dtype=torch.long)
    for h in range(old.heads):
        heads[(h // g_old) * g_new + h % g_old] = h
    axes = {}
    for kind in (HIDDEN, FFN, KV, VOCAB):
        n_old, n_new = axis_size(old, kind), axis_size(new, kind)
        axes[kind] = torch.cat([torch.arange(n_old), torch.full((n_new - n_old,), -1, dtype=torch.long)])
    axes[HEADS] = heads
    axes[Q] = expand_heads(heads, old.head_dim)
    return axes


def tiling_axes(old: ModelSpec, new: ModelSpec) -> dict[str, torch.Tensor]:
    """Every new index copies an old one: widths cycle through the old indices; kv head k'
    copies k' mod KV; query head h' (in group k', at rank r) copies old head
    (k' mod KV) * g + r mod g, so it reads the copy of its own old kv head."""
    g_old, g_new = old.group_size, new.group_size
    hn = torch.arange(new.heads)
    heads = ((hn // g_new) % old.kv_heads) * g_old + (hn % g_new) % g_old
    kv_heads = torch.arange(new.kv_heads) % old.kv_heads
    axes = {HIDDEN: torch.arange(new.hidden) % old.hidden, FFN: torch.arange(new.ffn) % old.ffn,
            VOCAB: torch.arange(new.vocab), HEADS: heads}
    axes[Q] = expand_heads(heads, old.head_dim)
    axes[KV] = expand_heads(kv_heads, old.head_dim)
    return axes


def expand_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head source indices -> per-coordinate source indices (-1 stays -1)."""
    coords = heads[:, None] * head_dim + torch.arange(head_dim)[None, :]
    return torch.where(heads[:, None] >= 0, coords, -1).flatten()


# -- building tensors --------------------------------------------------------------------

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
    if len(kinds) == 1:
        out[sel[0]] = vals[srcs[0][sel[0]]]
    else:
        out[sel[0][:, None], sel[1][None, :]] = vals[srcs[0][sel[0]][:, None], srcs[1][sel[1]][None, :]]
    return out


def fully_copied(plan: GrowthPlan, name: str, kinds: tuple[str, ...]) -> bool:
    return plan.source(name) is not None and all(bool((plan.axes[k] >= 0).all()) for k in kinds)


# fill(plan, name, shape, get_old, generator) -> tensor of the new shape for new entries
Fill = Callable[[GrowthPlan, str, tuple, Callable, "torch.Generator | None"], torch.Tensor]


def tensor_generator(generator: torch.Generator | None, name: str) -> torch.Generator | None:
    """The random stream of one grown tensor, seeded by the growth's seed and the tensor's
    name: a tensor's new entries are the same whichever rank grows it, in whatever order,
    and whichever other tensors are grown, so the growth can be split over ranks (any
    layout) and still give the same bits as growing the whole state in one process."""
    if generator is None:
        return None
    digest = hashlib.sha256(f"{generator.initial_seed()}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def iter_grown(plan: GrowthPlan, fill: Fill, get_old: Callable[[str], torch.Tensor | None],
               generator: torch.Generator | None = None, finish=None,
               names: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, grown tensor) in canonical order (only `names`, if given), reading only
    the old tensors each one needs through `get_old`: memory stays at a few tensors, so a
    checkpoint can be grown from disk, and a share of it by each rank. `finish(plan, name,
    tensor)` lets an operator adjust a built tensor."""
    for name, kinds in all_axes(plan.new).items():
        if names is not None and name not in names:
            continue
        shape = tuple(axis_size(plan.new, k) for k in kinds)
        src = plan.source(name)
        old = get_old(src) if src is not None else None
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
               generator: torch.Generator | None = None, finish=None) -> dict[str, torch.Tensor]:
    return dict(iter_grown(plan, fill, state.get, generator, finish))


def moment_power(kind: str) -> int:
    """exp_avg follows the gradient (power 1), exp_avg_sq its square (power 2)."""
    if kind not in ("exp_avg", "exp_avg_sq"):
        raise GrowthError("moments", f"unknown optimizer moment {kind!r}; allowed: exp_avg, exp_avg_sq")
    return 2 if kind == "exp_avg_sq" else 1


def iter_moments(plan: GrowthPlan, get_old: Callable[[str], torch.Tensor | None],
                 kind: str, names: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
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
        src = plan.source(name)
        old = get_old(src) if src is not None else None
        out = torch.zeros(shape, dtype=old.dtype if old is not None else torch.float32)
        if old is not None:
            factor = plan.gradient_scale(name, kinds) ** power if plan.moments_rule == "staged" else 1.0
            factor /= plan.reparam.get(name, 1.0) ** power
            out = place(out, old, kinds, plan.axes, factor)
        yield name, out


def grow_moments_with(plan: GrowthPlan, moments: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    return dict(iter_moments(plan, moments.get, kind))


def random_fill(plan: GrowthPlan, name: str, shape: tuple, get_old, generator) -> torch.Tensor:
    """New entries at the grown model's own init scale (ALiBi: slopes of the new head count)."""
    return init_tensor(name, shape, plan.new, generator)
