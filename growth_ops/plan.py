"""The growth plan: what an operator decides before any tensor is built.

A `GrowthPlan` says, for every axis kind, which old index each new index comes from (-1:
a new index), which old block each new block comes from (-1: a new block), and by how much
copied entries are scaled. Operators differ only in the plan and in how they fill new
entries, so one builder serves all of them (`grown_tensors`), and one rule carries Adam's
moments for all of them (`moments`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layer_placement import layer_name
from .mup_reparam import mup_reparam
from .spec import ModelSpec


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
