"""The rules of a growth schedule, checked on the resolved schedule: stage names, shapes and
contexts, learning rates, batch splits, growth reachability between stages, muP's base shape
and the wsd decay window. Registered with orchestrator.config.checks."""
from __future__ import annotations

import dataclasses

from growth_ops import GrowthError, get_operator
from growth_ops.spec import moe_settings_only

from orchestrator.config.checks import check
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import StageConfig
from orchestrator.schedule.resolve import ResolvedStage, Schedule, stage_steps, tokens_of_steps, wsd_decay_steps


@check("settings")
def stage_names(schedule: Schedule) -> None:
    cfg = schedule.cfg
    names = [s.name for s in cfg.schedule.stages]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"schedule.stages.{i}.name", f"{name!r} is used by two stages")
    if cfg.run.only_stage is not None and cfg.run.only_stage not in names:
        raise ConfigError("run.only_stage", f"{cfg.run.only_stage!r} is not a stage; allowed: {', '.join(names)}")


@check("stages")
def mup_base_shape(schedule: Schedule) -> None:
    """Under muP the base shape must not be wider than the first stage: m < 1 would be an
    extrapolation nobody tuned."""
    m, first = schedule.cfg.model, schedule.cfg.schedule.stages[0]
    if m.parametrization == "mup" and m.mup.base_hidden is not None and m.mup.base_hidden > first.shape.hidden:
        raise ConfigError("model.mup.base_hidden", f"{m.mup.base_hidden} is larger than the first stage's "
                                                   f"hidden size {first.shape.hidden} ({first.name!r}); the "
                                                   f"base shape is the small proxy: allowed: 1..{first.shape.hidden}, "
                                                   "or null for the first stage's")


@check("stages")
def stages(schedule: Schedule) -> None:
    cfg = schedule.cfg
    for i, stage in enumerate(cfg.schedule.stages):
        key = f"schedule.stages.{i}"
        _shape(cfg.model.position, key, stage)
        _context(cfg.model.position, key, stage)
        first = tokens_of_steps(stage, 1)
        if stage.tokens < first:
            raise ConfigError(f"{key}.tokens", f"{stage.tokens} is less than one step "
                                               f"(batch_size x its context = {first})")
        lr = stage.lr
        if lr.peak is None and i == 0:
            raise ConfigError(f"{key}.lr.peak", "the first stage has no learning rate to inherit; set a number")
        if lr.peak is not None and lr.min > lr.peak:
            raise ConfigError(f"{key}.lr.min", f"{lr.min} is above lr.peak={lr.peak}")
        steps = stage_steps(stage)
        if lr.warmup_steps >= steps:
            raise ConfigError(f"{key}.lr.warmup_steps", f"{lr.warmup_steps} is not below the stage's {steps} "
                                                        f"steps: the rate would never reach its peak; "
                                                        f"allowed: 0..{steps - 1}")
        _batch_split(key, stage)
        if i == 0 and stage.growth is not None and cfg.init_from is None:
            raise ConfigError(f"{key}.growth", "the first stage has nothing to grow from (no init_from); "
                                               "set null")


def _shape(position: str, key: str, stage: StageConfig) -> None:
    s = stage.shape
    if s.hidden % s.heads:
        raise ConfigError(f"{key}.shape.heads", f"{s.heads} does not divide hidden={s.hidden} "
                                                "(head_dim = hidden / heads)")
    if (s.hidden // s.heads) % 2 and position == "rope":
        raise ConfigError(f"{key}.shape.heads", "RoPE needs an even head_dim = hidden / heads")
    if s.kv_heads and s.heads % s.kv_heads:
        raise ConfigError(f"{key}.shape.kv_heads", f"{s.kv_heads} does not divide heads={s.heads}")


def _context(position: str, key: str, stage: StageConfig) -> None:
    """The within-stage mixture of contexts and RoPE's scaling of a stage."""
    if stage.long_fraction > 0 and stage.long_seq_len is None:
        raise ConfigError(f"{key}.long_seq_len", f"long_fraction={stage.long_fraction} needs the long "
                                                 "context; set a number above seq_len")
    if stage.long_seq_len is not None and stage.long_seq_len <= stage.seq_len:
        raise ConfigError(f"{key}.long_seq_len", f"{stage.long_seq_len} is not above seq_len={stage.seq_len}; "
                                                 f"allowed: > {stage.seq_len}, or null")
    for f in ("rope_theta", "interpolation"):
        if getattr(stage.position, f) is not None and position != "rope":
            raise ConfigError(f"{key}.position.{f}", f"RoPE scaling, but model.position={position} "
                                                     "(ALiBi needs nothing to run at a longer context); set null")


def _batch_split(key: str, stage: StageConfig) -> None:
    lay = stage.layout
    if stage.batch_size % lay.dp:
        raise ConfigError(f"{key}.batch_size", f"{stage.batch_size} is not divisible by layout.dp={lay.dp}")
    per_rank = stage.batch_size // lay.dp
    if lay.micro_batch_size and per_rank % lay.micro_batch_size:
        raise ConfigError(f"{key}.layout.micro_batch_size",
                          f"{lay.micro_batch_size} does not divide the per-rank batch {per_rank}")


# which stage key a growth operator's complaint about a field is about
_GROWTH_FIELDS = {"head_dim": "shape.heads", "hidden": "shape.hidden", "layers": "shape.layers",
                  "ffn": "shape.ffn", "heads": "shape.heads", "kv_heads": "shape.kv_heads",
                  "layer_insert": "growth.layer_insert", "init": "growth.init", "moments": "growth.moments",
                  "operator": "growth.operator", "drop_ratio": "growth.drop_ratio", "experts": "moe.experts",
                  "top_k": "moe.top_k"}


def _message(e: GrowthError) -> str:
    return str(e).split(": ", 1)[1]


@check("schedule")
def growth(schedule: Schedule) -> None:
    """Each stage's shape is reachable from the one before with its operator and options."""
    for prev, stage in zip(schedule, schedule.stages[1:]):
        check_growth(prev, stage)


def check_growth(prev: ResolvedStage, stage: ResolvedStage) -> None:
    """`stage` is reachable from `prev` with its operator and options (also used for init_from)."""
    key, growth = f"schedule.stages.{stage.index}", stage.growth
    try:
        op = get_operator(growth.operator or "")
    except GrowthError as e:
        raise ConfigError(f"{key}.growth.operator", _message(e)) from None
    old = prev.spec
    # growth runs at the old RoPE scaling; a change of scaling is a separate, reported step
    new = dataclasses.replace(stage.spec, **old.rope_scaling())
    if old == new or moe_settings_only(old, new):
        return  # no shape change: the stage only changes tokens, batch, context, positions, data or MoE settings
    try:
        op.check(old, new, growth.layer_insert or "append", growth.init, growth.moments, growth.drop_ratio)
    except GrowthError as e:
        msg = _message(e)
        if e.field == "head_dim":
            msg = (f"head_dim = hidden / heads must stay {old.head_dim} across growth "
                   f"(got {new.head_dim}); grow heads with hidden")
        raise ConfigError(f"{key}.{_GROWTH_FIELDS.get(e.field, e.field)}", msg) from None
    if growth.ramp_steps is None or growth.ramp_steps < 0:
        raise ConfigError(f"{key}.growth.ramp_steps", "must be >= 0")
    if op.uses_masks:  # msg at ramp_steps=0 would put its new weights live at once
        try:
            op.check_ramp_steps(growth.ramp_steps)
        except GrowthError as e:
            raise ConfigError(f"{key}.growth.ramp_steps", _message(e)) from None
    if growth.ramp_steps >= stage.steps:
        raise ConfigError(f"{key}.growth.ramp_steps",
                          f"{growth.ramp_steps} must be below the stage's {stage.steps} steps "
                          "so the masks are gone before the next growth")


@check("stages")
def moe_routing(schedule: Schedule) -> None:
    """A token's top_k experts are among the stage's experts."""
    for i, stage in enumerate(schedule.cfg.schedule.stages):
        moe = stage.moe
        if moe is not None and moe.top_k > moe.experts:
            raise ConfigError(f"schedule.stages.{i}.moe.top_k", f"{moe.top_k} is more than the stage's "
                                                               f"{moe.experts} experts; allowed: 1..{moe.experts}")
        if moe is not None and moe.expert_parallel != 1:
            raise ConfigError(f"schedule.stages.{i}.moe.expert_parallel",
                              f"{moe.expert_parallel}: expert parallelism is not supported yet (every rank holds "
                              "every expert; layout.tp splits each expert's FFN, layout.dp/pp as for a dense "
                              "model); allowed: 1")


@check("schedule")
def wsd_window(schedule: Schedule) -> None:
    check_wsd_window(schedule.cfg.schedule.stages)


def check_wsd_window(stages: list[StageConfig]) -> None:
    """wsd decays only in the last stage, so its window must fit there after the re-warm."""
    i, last = len(stages) - 1, stages[-1]
    if last.lr.decay != "wsd":
        return
    window = wsd_decay_steps(stages, i)
    room = stage_steps(last) - last.lr.warmup_steps
    if window > room:
        raise ConfigError(f"schedule.stages.{i}.lr.decay_fraction",
                          f"{last.lr.decay_fraction} of the schedule's tokens is {window} steps of the last "
                          f"stage, which has {room} after its warmup; only the last stage decays under wsd: "
                          "lower it or give the last stage more tokens")
