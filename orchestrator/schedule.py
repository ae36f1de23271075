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



def parametrization_fields(cfg: RunConfig) -> dict:
    """ModelSpec's parametrization fields from model.parametrization and model.mup (none under
    standard); muP's base hidden size defaults to the first stage's."""
    m = cfg.model
    if m.parametrization != "mup":
        return {}
    base = m.mup.base_hidden or cfg.schedule.stages[0].shape.hidden
    return {"parametrization": "mup", "mup_base_hidden": base, "mup_output_mult": m.mup.output_mult,
            "mup_embed_mult": m.mup.embed_mult, "mup_attn_scale": m.mup.attn_scale}


def stage_spec(cfg: RunConfig, stage: StageConfig, vocab: int) -> ModelSpec:
    m, s = cfg.model, stage.shape
    return ModelSpec(layers=s.layers, hidden=s.hidden, ffn=s.ffn, heads=s.heads,
                     kv_heads=s.kv_heads or s.heads, head_dim=s.hidden // s.heads, vocab=vocab,
                     init_std=m.init_std, **{f: getattr(m, f) for f in ARCHITECTURE},
                     **parametrization_fields(cfg))


def effective_growth(cfg: RunConfig, stage: StageConfig) -> GrowthConfig:
    """The stage's growth fields over the top-level `growth` defaults."""
    merged = dataclasses.asdict(cfg.growth)
    merged.update({k: v for k, v in dataclasses.asdict(stage.growth or GrowthConfig()).items()
                   if v is not None})
    return GrowthConfig(**merged)


def stage_steps(stage: StageConfig) -> int:
    return stage.tokens // (stage.batch_size * stage.seq_len)


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

    @classmethod
    def alone(cls, config: StageConfig, spec: ModelSpec) -> "ResolvedStage":
        """One stage outside a schedule (benchmarks, engine tests), not grown into."""
        return cls(index=0, config=config, spec=spec, steps=stage_steps(config), growth=None,
                   flops_per_token=flops_per_token(spec, config.seq_len))

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
                                    flops_per_token=flops_per_token(spec, st.seq_len)))
    return Schedule(cfg=cfg, vocab=vocab, stages=tuple(stages))
