"""Masked Structural Growth (Yao et al., ICLR 2024) on the canonical state.

Grows hidden size, FFN size, query and kv heads (head dim fixed) and layers in one step.
Every old tensor entry is copied to its new position; new entries are random at the
model's init scale (breaking symmetry) and switched off by masks that start at 0, so the
grown model computes exactly the old function until the masks ramp up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .init import alibi_slopes, init_tensor
from .masks import MaskState
from .spec import (FFN, HEADS, HIDDEN, KV, Q, VOCAB, ModelSpec, axis_size, buffer_axes,
                   parameter_axes)

PRESERVES_FUNCTION = True
LAYER_INSERTS = ("append", "interleave")


class GrowthError(ValueError):
    """An impossible growth target; `field` names the offending shape field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def check_growth(old: ModelSpec, new: ModelSpec, layer_insert: str = "append") -> None:
    for f in ("norm", "mlp", "position", "tie_embeddings", "rope_theta", "norm_eps"):
        if getattr(old, f) != getattr(new, f):
            raise GrowthError(f, f"growth cannot change the architecture ({getattr(old, f)!r} -> "
                                 f"{getattr(new, f)!r})")
    for f in ("layers", "hidden", "ffn", "heads", "kv_heads"):
        if getattr(new, f) < getattr(old, f):
            raise GrowthError(f, f"cannot shrink ({getattr(old, f)} -> {getattr(new, f)}); "
                                 f"allowed: >= {getattr(old, f)}")
    if new.head_dim != old.head_dim:
        raise GrowthError("head_dim", f"must stay {old.head_dim}: growth adds heads, "
                                      "it never changes the head dimension")
    if new.vocab != old.vocab:
        raise GrowthError("vocab", f"must stay {old.vocab}")
    if new.heads % new.kv_heads:
        raise GrowthError("kv_heads", f"{new.kv_heads} does not divide heads={new.heads}")
    if new.group_size < old.group_size:
        raise GrowthError("kv_heads", f"query heads per kv head cannot fall ({old.group_size} -> "
                                      f"{new.group_size}): old query heads must keep their kv "
                                      f"head; allowed: kv_heads <= {new.heads // old.group_size}")
    if layer_insert not in LAYER_INSERTS:
        raise GrowthError("layer_insert", f"{layer_insert!r} is not one of {LAYER_INSERTS}")


@dataclass
class IndexMaps:
    """For each axis kind, the new position of every old index; and old layer -> new layer."""

    axes: dict[str, torch.Tensor]
    layers: list[int]

    def new_indices(self, kind: str, new_size: int) -> list[int]:
        taken = torch.zeros(new_size, dtype=torch.bool)
        taken[self.axes[kind]] = True
        return torch.nonzero(~taken).flatten().tolist()


def layer_positions(old_layers: int, new_layers: int, layer_insert: str) -> list[int]:
    """New position of each old layer. `interleave` spreads the new blocks evenly, each
    one after an old block, so no part of the network is all new."""
    if layer_insert == "append" or old_layers == new_layers:
        return list(range(old_layers))
    added = new_layers - old_layers
    return [i + (i * added) // old_layers for i in range(old_layers)]


def index_maps(old: ModelSpec, new: ModelSpec, layer_insert: str = "append") -> IndexMaps:
    # Old query head h belongs to kv group h // g. Placing it at (h // g) * g' + h % g keeps
    # it in the same group under the new group size g' >= g, new heads fill the gaps.
    g_old, g_new = old.group_size, new.group_size
    heads = torch.tensor([(h // g_old) * g_new + h % g_old for h in range(old.heads)])
    hd = old.head_dim
    q = (heads[:, None] * hd + torch.arange(hd)[None, :]).flatten()
    return IndexMaps(
        axes={HIDDEN: torch.arange(old.hidden), FFN: torch.arange(old.ffn), HEADS: heads, Q: q,
              KV: torch.arange(old.kv_dim), VOCAB: torch.arange(old.vocab)},
        layers=layer_positions(old.layers, new.layers, layer_insert))


def _place(old: torch.Tensor, new: torch.Tensor, kinds: tuple[str, ...], maps: IndexMaps) -> None:
    idx = [maps.axes[k] for k in kinds]
    if len(idx) == 1:
        new[idx[0]] = old.to(new.dtype)
    else:
        new[idx[0][:, None], idx[1][None, :]] = old.to(new.dtype)


def _new_name(name: str, maps: IndexMaps) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"layers.{maps.layers[int(i)]}.{rest}"
    return name


def grow_tensors(tensors: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec,
                 maps: IndexMaps, fill) -> dict[str, torch.Tensor]:
    """Place every old tensor into a new-shaped tensor made by `fill(name, shape)`."""
    old_axes = {**parameter_axes(old), **buffer_axes(old)}
    new_axes = {**parameter_axes(new), **buffer_axes(new)}
    out = {}
    for name, kinds in new_axes.items():
        shape = tuple(axis_size(new, k) for k in kinds)
        out[name] = fill(name, shape)
    for name, kinds in old_axes.items():
        if name in tensors:
            _place(tensors[name], out[_new_name(name, maps)], kinds, maps)
    return out


def grow(state: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec, *, ramp_steps: int,
         layer_insert: str = "append", generator: torch.Generator | None = None,
         ) -> tuple[dict[str, torch.Tensor], MaskState, IndexMaps]:
    """MSG: the grown state, the masks that keep it equal to the old function, and the
    index maps (for carrying optimizer moments)."""
    check_growth(old, new, layer_insert)
    maps = index_maps(old, new, layer_insert)

    def fill(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name == "alibi_slopes":  # new heads take their slope from the grown head count
            return alibi_slopes(shape[0])
        return init_tensor(name, shape, new, generator)

    grown = grow_tensors(state, old, new, maps, fill)
    new_layers = sorted(set(range(new.layers)) - set(maps.layers))
    masks = MaskState(ramp_steps=ramp_steps, hidden_new=maps.new_indices(HIDDEN, new.hidden),
                      ffn_new=maps.new_indices(FFN, new.ffn),
                      heads_new=maps.new_indices(HEADS, new.heads), layers_new=new_layers)
    return grown, masks, maps


def grow_moments(moments: dict[str, torch.Tensor], old: ModelSpec, new: ModelSpec,
                 maps: IndexMaps) -> dict[str, torch.Tensor]:
    """Adam moments: copied for old coordinates, zero for new ones."""
    return grow_tensors(moments, old, new, maps, lambda name, shape: torch.zeros(shape))
