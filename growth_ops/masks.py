"""MSG mask state: which coordinates are new and how far their masks have ramped.

A mask is 1 on old structure and `value` on new structure; `value` ramps linearly
0 -> 1 over `ramp_steps` optimizer steps. At 0 the grown model computes the old
function exactly; at 1 the masks are dropped and cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def _to_ranges(indices: list[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for i in sorted(indices):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def _from_ranges(ranges: list[list[int]]) -> list[int]:
    return [i for start, stop in ranges for i in range(start, stop)]


@dataclass
class MaskState:
    ramp_steps: int
    steps_done: int = 0
    hidden_new: list[int] = field(default_factory=list)  # new residual coordinates
    ffn_new: list[int] = field(default_factory=list)  # new FFN neurons of old layers
    heads_new: list[int] = field(default_factory=list)  # new query heads of old layers
    layers_new: list[int] = field(default_factory=list)  # whole new blocks

    @property
    def value(self) -> float:
        if self.ramp_steps <= 0:
            return 1.0
        return min(1.0, self.steps_done / self.ramp_steps)

    @property
    def done(self) -> bool:
        return self.value >= 1.0

    def advance(self, steps: int = 1) -> None:
        self.steps_done += steps

    def to_dict(self) -> dict:
        return {"ramp_steps": self.ramp_steps, "steps_done": self.steps_done,
                "hidden_new": _to_ranges(self.hidden_new), "ffn_new": _to_ranges(self.ffn_new),
                "heads_new": _to_ranges(self.heads_new), "layers_new": list(self.layers_new)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "MaskState | None":
        if d is None:
            return None
        return cls(ramp_steps=d["ramp_steps"], steps_done=d["steps_done"],
                   hidden_new=_from_ranges(d["hidden_new"]), ffn_new=_from_ranges(d["ffn_new"]),
                   heads_new=_from_ranges(d["heads_new"]), layers_new=list(d["layers_new"]))
