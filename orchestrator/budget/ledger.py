"""Budget ledger: what a run has spent, per stage and in total.

The ledger travels inside every checkpoint, so a resumed run continues from the spend
recorded with the state it resumes, and work redone after a crash is not counted twice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Spend:
    tokens: int = 0
    steps: int = 0
    flops: float = 0.0
    wall_s: float = 0.0
    gpu_hours: float = 0.0
    cost_usd: float = 0.0
    sources: dict[str, int] = field(default_factory=dict)  # training tokens read from each data source
    # The stage's last timed step: a run stopped at its dollar cap priced the refused step by
    # it, so a resume prices its first step the same way and stops again instead of creeping.
    last_step_s: float = 0.0
    # The stage's model: every parameter (what memory holds) and those a token computes with
    # (a mixture of experts: top_k experts; its FLOPs count these). A stage's, not summed.
    params: int = 0
    active_params: int = 0

    def add(self, tokens: int, flops: float, seconds: float, devices: int, usd_per_gpu_hour: float) -> None:
        self.tokens += tokens
        self.steps += 1
        self.flops += flops
        self.wall_s += seconds
        if seconds > 0:
            self.last_step_s = seconds
        gpu_hours = seconds * devices / 3600.0
        self.gpu_hours += gpu_hours
        self.cost_usd += gpu_hours * usd_per_gpu_hour


@dataclass
class Ledger:
    stages: dict[str, Spend] = field(default_factory=dict)
    # Per stage: restarts (requeue, preemption, crash) and wall seconds lost to them (from the
    # checkpoint resumed to the restart: queue wait, startup, work redone). Kept apart from
    # the spend above, which counts every token and second of useful work once.
    lost: dict[str, dict] = field(default_factory=dict)

    def stage(self, name: str) -> Spend:
        return self.stages.setdefault(name, Spend())

    def add_source_tokens(self, name: str, tokens: dict[str, int]) -> None:
        sources = self.stage(name).sources
        for source, n in tokens.items():
            sources[source] = sources.get(source, 0) + n

    def add_lost(self, name: str, seconds: float) -> None:
        entry = self.lost.setdefault(name, {"restarts": 0, "lost_s": 0.0})
        entry["restarts"] += 1
        entry["lost_s"] += seconds

    @property
    def total(self) -> Spend:
        t = Spend()
        for s in self.stages.values():
            for k, v in asdict(s).items():
                if k in PER_STAGE:
                    continue  # a stage's, not a sum
                if k == "sources":
                    for source, n in v.items():
                        t.sources[source] = t.sources.get(source, 0) + n
                else:
                    setattr(t, k, getattr(t, k) + v)
        return t

    def to_dict(self) -> dict:
        out = {name: asdict(s) for name, s in self.stages.items()}
        if self.lost:
            out[LOST_KEY] = {k: dict(v) for k, v in self.lost.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        d = dict(d)
        lost = d.pop(LOST_KEY, {})
        return cls({name: Spend(**s) for name, s in d.items()}, {k: dict(v) for k, v in lost.items()})


LOST_KEY = "_lost"  # in the serialized ledger, beside the stage names
PER_STAGE = ("last_step_s", "params", "active_params")  # Spend fields that are not sums
