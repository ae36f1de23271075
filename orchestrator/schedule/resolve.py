"""The resolved schedule: every derived value of a parsed config, computed once.

`resolve(cfg)` turns a `RunConfig` into a `Schedule` whose stages carry their model spec
(with the run's padded vocabulary), steps, tokens, effective growth settings, parallel
layout and world size, and FLOPs per token and per step. A command resolves once, the
registered checks read the result, and the runner, stage loop, budget, planner, launcher
and Slurm read it too; none recomputes them. Only the vocabulary can change afterwards,
when a trained tokenizer comes out smaller than configured (`Schedule.for_tokenizer`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from growth_ops import ModelSpec
from growth_ops.spec import ARCHITECTURE, ROPE_SCALING, flops_per_token

from orchestrator.config.schema import BYTE_VOCAB, GrowthConfig, LayoutConfig, RunConfig, StageConfig
from orchestrator.config.tokenizer_file import hf_vocab_size


def stage_rope_scaling(cfg: RunConfig, stage: StageConfig) -> dict:
    """RoPE's scaling in effect in `stage` (one of cfg.schedule.stages): each null field of a
    stage's `position` keeps the value of the stage before; the first stage starts from
    model.rope_theta and no interpolation."""
    scaling = {"rope_theta": cfg.model.rope_theta, "rope_interpolation": 1.0}
    for st in cfg.schedule.stages:
        if st.position.rope_theta is not None:
            scaling["rope_theta"] = st.position.rope_theta
        if st.position.interpolation is not None:
            scaling["rope_interpolation"] = st.position.interpolation
        if st is stage:
            break
    return scaling


def parametrization_fields(cfg: RunConfig) -> dict:
    """ModelSpec's parametrization fields from model.parametrization and model.mup (none under
    standard); muP's base hidden size defaults to the first stage's."""
    m = cfg.model
    if m.parametrization != "mup":
        return {}
    base = m.mup.base_hidden or cfg.schedule.stages[0].shape.hidden
    return {"parametrization": "mup", "mup_base_hidden": base, "mup_output_mult": m.mup.output_mult,
            "mup_embed_mult": m.mup.embed_mult, "mup_attn_scale": m.mup.attn_scale}


def moe_fields(stage: StageConfig) -> dict:
    """ModelSpec's mixture-of-experts fields from the stage's `moe` (none: dense)."""
    moe = stage.moe
    if moe is None:
        return {}
    return {"experts": moe.experts, "top_k": moe.top_k, "capacity_factor": moe.capacity_factor,
            "aux_loss_coef": moe.aux_loss_coef}


def stage_spec(cfg: RunConfig, stage: StageConfig, vocab: int) -> ModelSpec:
    m, s = cfg.model, stage.shape
    fixed = {f: getattr(m, f) for f in ARCHITECTURE if f not in ROPE_SCALING}
    return ModelSpec(layers=s.layers, hidden=s.hidden, ffn=s.ffn, heads=s.heads,
                     kv_heads=s.kv_heads or s.heads, head_dim=s.hidden // s.heads, vocab=vocab,
                     init_std=m.init_std, **fixed, **stage_rope_scaling(cfg, stage),
                     **parametrization_fields(cfg), **moe_fields(stage))


def effective_growth(cfg: RunConfig, stage: StageConfig) -> GrowthConfig:
    """The stage's growth fields over the top-level `growth` defaults."""
    merged = dataclasses.asdict(cfg.growth)
    merged.update({k: v for k, v in dataclasses.asdict(stage.growth or GrowthConfig()).items()
                   if v is not None})
    return GrowthConfig(**merged)


# -- the contexts of a stage's steps ------------------------------------------------------
# A stage trains at seq_len, except that with `long_fraction` f > 0 step k (from 0) is at
# long_seq_len when floor((k + 1) f) > floor(k f): the long steps are spread evenly, the
# first n steps hold exactly floor(n f) of them (f taken exactly, as a fraction), and a step's
# context is a function of its number alone, so a resume reads the same batches.

def long_steps(stage: StageConfig, n: int) -> int:
    """Long-context steps among the stage's first `n` steps."""
    if not stage.long_seq_len or stage.long_fraction <= 0:
        return 0
    return math.floor(n * Fraction(stage.long_fraction))


def step_seq_len(stage: StageConfig, step: int) -> int:
    """The context of the stage's step `step` (0-based)."""
    return stage.long_seq_len if long_steps(stage, step + 1) > long_steps(stage, step) else stage.seq_len


def max_seq_len(stage: StageConfig) -> int:
    """The longest context a stage trains at (what memory must hold)."""
    return max(stage.seq_len, stage.long_seq_len or 0) if stage.long_fraction > 0 else stage.seq_len


def tokens_of_steps(stage: StageConfig, n: int) -> int:
    """Tokens the first `n` steps of a stage train on."""
    long = long_steps(stage, n)
    return stage.batch_size * ((n - long) * stage.seq_len + long * (stage.long_seq_len or 0))


def stage_steps(stage: StageConfig) -> int:
    """Whole steps within the stage's `tokens`."""
    lo, hi = 0, stage.tokens // (stage.batch_size * stage.seq_len)  # no step is shorter than seq_len
    while lo < hi:  # the most steps whose tokens fit
        mid = (lo + hi + 1) // 2
        if tokens_of_steps(stage, mid) <= stage.tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
    come out a little smaller on a small corpus; the runner then passes the real size). hf:
    the ids its tokenizer.json defines, read with json (data.tokenizer.vocab_size when the
    file cannot be read: the data checks refuse it, by name)."""
    t = cfg.data.tokenizer
    if t.kind == "hf" and t.path:
        try:
            return hf_vocab_size(t.path)
        except (OSError, ValueError, TypeError, KeyError):
            pass
    return BYTE_VOCAB if t.kind == "byte" else t.vocab_size


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
        """Tokens of a step at the stage's `seq_len` (with a context mixture, long steps
        have more: `tokens_at`)."""
        return self.config.batch_size * self.config.seq_len

    @property
    def step_flops(self) -> float:
        """FLOPs of a step at the stage's `seq_len` (long steps: `flops_at`)."""
        return self.flops_per_token * self.step_tokens

    def seq_len_at(self, step: int) -> int:
        """The context of step `step` (0-based) of this stage."""
        return step_seq_len(self.config, step)

    def tokens_at(self, step: int) -> int:
        return self.config.batch_size * self.seq_len_at(step)

    def flops_at(self, step: int) -> float:
        """Model FLOPs of step `step`: the attention term grows with its context."""
        seq_len = self.seq_len_at(step)
        return flops_per_token(self.spec, seq_len) * self.config.batch_size * seq_len

    def tokens_between(self, start: int, end: int) -> int:
        """Tokens of steps [start, end)."""
        return tokens_of_steps(self.config, end) - tokens_of_steps(self.config, start)

    def flops_between(self, start: int, end: int) -> float:
        """Model FLOPs of steps [start, end)."""
        c = self.config
        long = long_steps(c, end) - long_steps(c, start)
        flops = (end - start - long) * self.step_flops
        if long:
            flops += long * flops_per_token(self.spec, c.long_seq_len) * c.batch_size * c.long_seq_len
        return flops

    @property
    def tokens(self) -> int:
        """Tokens the stage trains on: whole steps only."""
        return self.tokens_between(0, self.steps)

    @property
    def flops(self) -> float:
        return self.flops_between(0, self.steps)


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

    def for_tokenizer(self, tokenizer_size: int) -> "Schedule":
        """This schedule for the prepared tokenizer's real vocabulary (a trained BPE may come
        out smaller than configured): the same schedule when the padded size is unchanged."""
        vocab = padded_vocab(self.cfg, tokenizer_size)
        if vocab == self.vocab:
            return self
        return Schedule(cfg=self.cfg, vocab=vocab, stages=tuple(
            dataclasses.replace(s, spec=dataclasses.replace(s.spec, vocab=vocab),
                                flops_per_token=flops_per_token(dataclasses.replace(s.spec, vocab=vocab),
                                                                s.config.seq_len))
            for s in self.stages))


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
