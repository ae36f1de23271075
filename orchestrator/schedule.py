"""The resolved schedule: every derived value of a validated config, computed once.

`resolve(cfg, tokenizer_vocab)` turns a `RunConfig` into a `Schedule` whose stages carry
their model spec (with the run's padded vocabulary), steps, tokens, effective growth
settings, parallel layout and world size, and FLOPs per token and per step. The runner,
stage loop, budget, planner, launcher and Slurm read these; none recomputes them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from growth_ops import ModelSpec
from growth_ops.spec import ARCHITECTURE

from orchestrator.data.tokenizer import ByteTokenizer
from orchestrator.config.schema import GrowthConfig, LayoutConfig, RunConfig, StageConfig
from orchestrator.model import flops_per_token



def stage_spec(cfg: RunConfig, stage: StageConfig, vocab: int) -> ModelSpec:
    m, s = cfg.model, stage.shape
    return ModelSpec(layers=s.layers, hidden=s.hidden, ffn=s.ffn, heads=s.heads,
                     kv_heads=s.kv_heads or s.heads, head_dim=s.hidden // s.heads, vocab=vocab,
                     init_std=m.init_std, **{f: getattr(m, f) for f in ARCHITECTURE})


def effective_growth(cfg: RunConfig, stage: StageConfig) -> GrowthConfig:
    """The stage's growth fields over the top-level `growth` defaults."""
    merged = dataclasses.asdict(cfg.growth)
    merged.update({k: v for k, v in dataclasses.asdict(stage.growth or GrowthConfig()).items()
                   if v is not None})
    return GrowthConfig(**merged)


def stage_steps(stage: StageConfig) -> int:
    return stage.tokens // (stage.batch_size * stage.seq_len)


def wsd_decay_steps(stages: list[StageConfig], index: int) -> int:
    """Updates of stage `index` that decay under `lr.decay: wsd`: none but in the last stage,
    which decays over the last stage's `lr.decay_fraction` of the whole schedule's tokens (a
    share of the schedule, as for a scratch run, so that runs of different stage splits
    decay over the same tokens), in whole steps of the last stage, at least one."""
    stage = stages[index]
    if stage.lr.decay != "wsd" or index != len(stages) - 1:
        return 0
    total = sum(stage_steps(s) * s.batch_size * s.seq_len for s in stages)
    return max(1, round(stage.lr.decay_fraction * total / (stage.batch_size * stage.seq_len)))


def layout_world(layout: LayoutConfig) -> int:
    """Ranks a layout runs on (one device each)."""
    return layout.tp * layout.pp * layout.dp


def tokenizer_vocab(cfg: RunConfig) -> int:
    """The tokenizer's vocabulary as configured, before any data is read (a trained BPE may
    come out a little smaller on a small corpus; the runner then passes the real size)."""
    t = cfg.data.tokenizer
    return ByteTokenizer.vocab_size if t.kind == "byte" else t.vocab_size


def padded_vocab(cfg: RunConfig, tokenizer_size: int) -> int:
    """model.vocab_size, else the tokenizer's size rounded up to model.vocab_multiple."""
    m = cfg.model
    return m.vocab_size or -(-tokenizer_size // m.vocab_multiple) * m.vocab_multiple


@dataclass(frozen=True)
class ResolvedStage:
    index: int
    config: StageConfig
    spec: ModelSpec
    steps: int
    growth: GrowthConfig | None  # effective settings; None where the stage is not grown into
    flops_per_token: float
    lr_decay_steps: int = 0  # wsd: the final updates that decay (orchestrator.run.lr)

    @classmethod
    def alone(cls, config: StageConfig, spec: ModelSpec) -> "ResolvedStage":
        """One stage outside a schedule (benchmarks, engine tests), not grown into."""
        return cls(index=0, config=config, spec=spec, steps=stage_steps(config), growth=None,
                   flops_per_token=flops_per_token(spec, config.seq_len),
                   lr_decay_steps=wsd_decay_steps([config], 0))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def layout(self) -> LayoutConfig:
        return self.config.layout

    @property
    def world(self) -> int:
        return layout_world(self.config.layout)

    @property
    def step_tokens(self) -> int:
        return self.config.batch_size * self.config.seq_len

    @property
    def tokens(self) -> int:
        """Tokens the stage trains on: whole steps only."""
        return self.steps * self.step_tokens

    @property
    def step_flops(self) -> float:
        return self.flops_per_token * self.step_tokens


@dataclass(frozen=True)
class Schedule:
    cfg: RunConfig
    vocab: int
    stages: tuple[ResolvedStage, ...]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> ResolvedStage:
        return self.stages[index]

    def __iter__(self):
        return iter(self.stages)


def resolve(cfg: RunConfig, tokenizer_size: int | None = None) -> Schedule:
    """`tokenizer_size`: the prepared tokenizer's vocabulary; None: as configured."""
    vocab = padded_vocab(cfg, tokenizer_vocab(cfg) if tokenizer_size is None else tokenizer_size)
    stages = []
    for i, st in enumerate(cfg.schedule.stages):
        spec = stage_spec(cfg, st, vocab)
        grown = i > 0 or cfg.init_from is not None
        stages.append(ResolvedStage(index=i, config=st, spec=spec, steps=stage_steps(st),
                                    growth=effective_growth(cfg, st) if grown else None,
                                    flops_per_token=flops_per_token(spec, st.seq_len),
                                    lr_decay_steps=wsd_decay_steps(cfg.schedule.stages, i)))
    return Schedule(cfg=cfg, vocab=vocab, stages=tuple(stages))
