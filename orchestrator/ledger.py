"""Budget ledger: what a run has spent, per stage and in total, and the caps it obeys.

The ledger travels inside every checkpoint, so a resumed run continues from the spend
recorded with the state it resumes, and work redone after a crash is not counted twice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import BudgetConfig, ClusterConfig


@dataclass
class Spend:
    tokens: int = 0
    steps: int = 0
    flops: float = 0.0
    wall_s: float = 0.0
    gpu_hours: float = 0.0
    cost_usd: float = 0.0

    def add(self, tokens: int, flops: float, seconds: float, devices: int, usd_per_gpu_hour: float) -> None:
        self.tokens += tokens
        self.steps += 1
        self.flops += flops
        self.wall_s += seconds
        gpu_hours = seconds * devices / 3600.0
        self.gpu_hours += gpu_hours
        self.cost_usd += gpu_hours * usd_per_gpu_hour


@dataclass
class Ledger:
    stages: dict[str, Spend] = field(default_factory=dict)

    def stage(self, name: str) -> Spend:
        return self.stages.setdefault(name, Spend())

    @property
    def total(self) -> Spend:
        t = Spend()
        for s in self.stages.values():
            for k, v in asdict(s).items():
                setattr(t, k, getattr(t, k) + v)
        return t

    def to_dict(self) -> dict:
        return {name: asdict(s) for name, s in self.stages.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        return cls({name: Spend(**s) for name, s in d.items()})


class BudgetGuard:
    """Says, before a step is taken, whether it would cross a cap."""

    def __init__(self, budget: BudgetConfig, cluster: ClusterConfig):
        self.budget, self.cluster = budget, cluster

    def blocks(self, total: Spend, step_tokens: int, step_flops: float, step_seconds: float,
               devices: int) -> str | None:
        b = self.budget
        if b.max_tokens is not None and total.tokens + step_tokens > b.max_tokens:
            return f"budget.max_tokens={b.max_tokens}"
        if b.max_flops is not None and total.flops + step_flops > b.max_flops:
            return f"budget.max_flops={b.max_flops:.4g}"
        step_usd = step_seconds * devices / 3600.0 * self.cluster.usd_per_gpu_hour
        if b.max_usd is not None and total.cost_usd + step_usd > b.max_usd:
            return f"budget.max_usd={b.max_usd}"
        return None
