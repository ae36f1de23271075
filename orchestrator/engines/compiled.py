"""What `train.compile=true` needs of an engine, shared by both engines.

torch.compile guards a compiled graph on the Python state it read: a growth changes the
model's shapes (the next stage compiles once, from a fresh dynamo cache: `fresh_compiler`),
but inside a stage nothing may change what the graph was traced on. Two things would:
- the RoPE tables' cache (a dict keyed by length: a graph traced while filling it is
  guarded on its contents). `TracedPositions` computes the tables inside the graph instead
  (a few hundred cos/sin, fused by inductor);
- the end of a growth ramp, where the masks go from tensors to None (another graph).
  `held_at_one` keeps a finished ramp's masks as tensors of ones until the stage ends:
  mask values change, never the graph. The function is the same (x * 1 = x; the masked
  norm at an all-ones mask is the plain norm up to fp32 rounding).
Evaluation runs the model eagerly (no_grad and eval mode would be another graph, and a
validation set of another shape one more): a few batches every eval_every_steps.
"""
from __future__ import annotations

import time

import torch

from growth_ops.masks import MaskState

from orchestrator.model import PositionTables, rope_tables


def fresh_compiler() -> None:
    """A new stage's engine starts with an empty dynamo cache: the previous stage's graphs
    are of another shape and would only count towards torch's recompile limit (8), after
    which it silently runs eagerly."""
    import torch._dynamo

    torch._dynamo.reset()


def compile_options(mode: str) -> dict:
    """torch.compile's keyword arguments for `train.compile_mode`: static shapes (a growth
    compiles anew; dynamic shapes would make every stage's kernels generic)."""
    return {"dynamic": False, "mode": None if mode == "default" else mode}


class TracedPositions(PositionTables):
    """PositionTables whose RoPE tables are computed inside a compiled graph (see module doc)."""

    def __call__(self, seq_len: int, device, alibi_slopes: torch.Tensor | None = None):
        if self.spec.position == "rope" and torch.compiler.is_compiling():
            s = self.spec
            return rope_tables(seq_len, s.head_dim, s.rope_theta, device, s.rope_interpolation), None
        return super().__call__(seq_len, device, alibi_slopes)


class _HeldRamp(MaskState):
    """A finished ramp seen as one still running at value 1 (its masks stay tensors)."""

    @property
    def done(self) -> bool:
        return False


def held_at_one(masks: MaskState | None) -> MaskState | None:
    """`masks`, or once its ramp is done, a copy whose masks stay tensors of ones."""
    if masks is None or not masks.done:
        return masks
    return _HeldRamp(**{k: getattr(masks, k) for k in masks.__dataclass_fields__})


class CompileClock:
    """The time the first step spent compiling: its wall time less the second step's (the
    first step of a compiled stage traces, lowers and builds the forward and backward).
    `take()` hands it out once, after the second step."""

    def __init__(self):
        self._steps: list[float] = []
        self._ready: float | None = None

    def step(self, fn):
        if len(self._steps) >= 2:
            return fn()
        start = time.perf_counter()
        out = fn()
        self._steps.append(time.perf_counter() - start)
        if len(self._steps) == 2:
            self._ready = max(0.0, self._steps[0] - self._steps[1])
        return out

    def take(self) -> float | None:
        ready, self._ready = self._ready, None
        return ready
