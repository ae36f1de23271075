"""Check a composed config against the schema and the rules of a growth schedule.

Everything here runs before any model is built or anything is written, so a bad key costs
the user seconds, not a queue slot. Errors name the full key and what is allowed.
`load_config` also reads the heads of the data files (`orchestrator.data.check`) and, for
a run on this machine (`runs_here`), checks its paths, device and memory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from growth_ops import GrowthError, MaskState, get_operator

from orchestrator.config.errors import ConfigError
from orchestrator.config.machine import check_runs_here
from orchestrator.config.schema import RunConfig, StageConfig
from orchestrator.data.check import check_data_sources
from orchestrator.data.corpus import SOURCE_KINDS
from orchestrator.data.errors import DataError
from orchestrator.data.mixture import check_ratios
from orchestrator.engines.registry import ENGINES, engine_kind
from orchestrator.model import flops_per_token
from orchestrator.proxy.scaling import read_fit
from orchestrator.schedule import (effective_growth, stage_spec, stage_steps, step_seq_len,
                                   tokenizer_vocab, tokens_of_steps, wsd_decay_steps)


# -- schema: keys and types -------------------------------------------------------------

INT_RANGE = (-(2**63), 2**63 - 1)  # what every consumer (torch, numpy, JSON readers) can hold

def _build(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _build(next(a for a in args if a is not type(None)), value, key)
    if value is None:
        raise ConfigError(key, f"must be set (expected {_type_name(tp)})")
    if value == "???":
        raise ConfigError(key, "is required and missing")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping with keys {_field_names(tp)}")
        hints = typing.get_type_hints(tp)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}" if key else unknown[0],
                              f"unknown key; allowed: {', '.join(_field_names(tp))}")
        kwargs = {f.name: _build(hints[f.name], value[f.name], f"{key}.{f.name}".lstrip("."))
                  for f in dataclasses.fields(tp) if f.name in value}
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_build(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise ConfigError(key, f"expected an integer, got {value!r}")
            value = int(value)  # 1e6 in YAML/overrides
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise ConfigError(key, f"{value} does not fit in 64 bits")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # no field gives infinity or NaN a meaning (null: no cap)
            raise ConfigError(key, f"must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp} not supported")  # a bug in config.py, not user input


def allowed_keys(key: str) -> list[str] | None:
    """The keys the schema allows beside `key` (a dotted path), or None if unknown."""
    tp: Any = RunConfig
    for part in key.split(".")[:-1]:
        while typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        if tp is None:
            return None
    while typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return _field_names(tp) if dataclasses.is_dataclass(tp) else None


def _field_names(tp) -> list[str]:
    return [f.name for f in dataclasses.fields(tp)]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not allowed; allowed: {', '.join(allowed)}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# -- rules ------------------------------------------------------------------------------

SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SEED_MAX = 2**32 - 1  # numpy's limit; torch seeds derived from it (seed x 1_000_003 + i) fit 64 bits


def _check_model(cfg: RunConfig) -> None:
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError("seed", f"must be in [0, {SEED_MAX}], got {cfg.seed}")
    m = cfg.model
    _choice("model.norm", m.norm, ("rmsnorm", "layernorm"))
    _choice("model.mlp", m.mlp, ("swiglu", "gelu"))
    _choice("model.position", m.position, ("rope", "alibi"))
    for key in ("rope_theta", "norm_eps", "init_std", "vocab_multiple"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.vocab_size", m.vocab_size)
    tokenizer = tokenizer_vocab(cfg)  # byte: 257; bpe: the configured size, which training never exceeds
    if m.vocab_size is not None and m.vocab_size < tokenizer:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is below the tokenizer's {tokenizer} ids "
                                              f"(data.tokenizer.kind={cfg.data.tokenizer.kind}); allowed: "
                                              f">= {tokenizer}, or null for the tokenizer's size")


def _check_parametrization(cfg: RunConfig) -> None:
    """model.parametrization and, under muP, model.mup (its base shape must not be wider than
    the first stage: m < 1 would be an extrapolation nobody tuned)."""
    m = cfg.model
    _choice("model.parametrization", m.parametrization, ("standard", "mup"))
    if m.parametrization != "mup":
        return
    mup, first = m.mup, cfg.schedule.stages[0]
    _positive("model.mup.base_hidden", mup.base_hidden)
    if mup.base_hidden is not None and mup.base_hidden > first.shape.hidden:
        raise ConfigError("model.mup.base_hidden", f"{mup.base_hidden} is larger than the first stage's "
                                                   f"hidden size {first.shape.hidden} ({first.name!r}); the "
                                                   f"base shape is the small proxy: allowed: 1..{first.shape.hidden}, "
                                                   "or null for the first stage's")
    _positive("model.mup.output_mult", mup.output_mult)
    _positive("model.mup.embed_mult", mup.embed_mult)
    _choice("model.mup.attn_scale", mup.attn_scale, ("inv", "sqrt"))


def _check_stage(cfg: RunConfig, i: int, stage: StageConfig, prev: StageConfig | None) -> None:
    key = f"schedule.stages.{i}"
    if not stage.name or "/" in stage.name:
        raise ConfigError(f"{key}.name", "must be a non-empty name without '/'")
    s = stage.shape
    for f in ("layers", "hidden", "ffn", "heads", "kv_heads"):
        _positive(f"{key}.shape.{f}", getattr(s, f))
    if s.hidden % s.heads:
        raise ConfigError(f"{key}.shape.heads", f"{s.heads} does not divide hidden={s.hidden} "
                                                "(head_dim = hidden / heads)")
    if (s.hidden // s.heads) % 2 and cfg.model.position == "rope":
        raise ConfigError(f"{key}.shape.heads", "RoPE needs an even head_dim = hidden / heads")
    if s.kv_heads and s.heads % s.kv_heads:
        raise ConfigError(f"{key}.shape.kv_heads", f"{s.kv_heads} does not divide heads={s.heads}")
    for f in ("tokens", "batch_size", "seq_len", "long_seq_len"):
        _positive(f"{key}.{f}", getattr(stage, f))
    _check_context(cfg, key, stage)
    first = tokens_of_steps(stage, 1)
    if stage.tokens < first:
        raise ConfigError(f"{key}.tokens", f"{stage.tokens} is less than one step "
                                           f"(batch_size x its context = {first})")
    lr = stage.lr
    if lr.peak is None and prev is None:
        raise ConfigError(f"{key}.lr.peak", "the first stage has no learning rate to inherit; set a number")
    _positive(f"{key}.lr.peak", lr.peak)
    _positive(f"{key}.lr.warmup_steps", lr.warmup_steps, allow_zero=True)
    _positive(f"{key}.lr.min", lr.min, allow_zero=True)
    _choice(f"{key}.lr.decay", lr.decay, ("cosine", "linear", "constant", "wsd"))
    if not 0 < lr.decay_fraction <= 1:
        raise ConfigError(f"{key}.lr.decay_fraction", f"{lr.decay_fraction} is not in (0, 1]")
    if lr.peak is not None and lr.min > lr.peak:
        raise ConfigError(f"{key}.lr.min", f"{lr.min} is above lr.peak={lr.peak}")
    _check_layout(cfg, key, stage)
    if stage.mixture:
        _check_ratios(f"{key}.mixture", stage.mixture, cfg.data.sources)
    if prev is None:
        if stage.growth is not None and cfg.init_from is None:
            raise ConfigError(f"{key}.growth", "the first stage has nothing to grow from (no init_from); "
                                               "set null")
        return
    _check_growth(cfg, key, stage, prev)


def _check_context(cfg: RunConfig, key: str, stage: StageConfig) -> None:
    """The within-stage mixture of contexts and RoPE's scaling of a stage."""
    if not 0 <= stage.long_fraction <= 1:
        raise ConfigError(f"{key}.long_fraction", f"must be in [0, 1], got {stage.long_fraction}")
    if stage.long_fraction > 0 and stage.long_seq_len is None:
        raise ConfigError(f"{key}.long_seq_len", f"long_fraction={stage.long_fraction} needs the long "
                                                 "context; set a number above seq_len")
    if stage.long_seq_len is not None and stage.long_seq_len <= stage.seq_len:
        raise ConfigError(f"{key}.long_seq_len", f"{stage.long_seq_len} is not above seq_len={stage.seq_len}; "
                                                 f"allowed: > {stage.seq_len}, or null")
    pos = stage.position
    for f in ("rope_theta", "interpolation"):
        value = getattr(pos, f)
        if value is not None and cfg.model.position != "rope":
            raise ConfigError(f"{key}.position.{f}", f"RoPE scaling, but model.position={cfg.model.position} "
                                                     "(ALiBi needs nothing to run at a longer context); set null")
        _positive(f"{key}.position.{f}", value)


def _check_layout(cfg: RunConfig, key: str, stage: StageConfig) -> None:
    lay = stage.layout
    for f in ("tp", "pp", "dp", "micro_batch_size"):
        _positive(f"{key}.layout.{f}", getattr(lay, f))
    if stage.batch_size % lay.dp:
        raise ConfigError(f"{key}.batch_size", f"{stage.batch_size} is not divisible by layout.dp={lay.dp}")
    per_rank = stage.batch_size // lay.dp
    if lay.micro_batch_size and per_rank % lay.micro_batch_size:
        raise ConfigError(f"{key}.layout.micro_batch_size",
                          f"{lay.micro_batch_size} does not divide the per-rank batch {per_rank}")


def _check_growth(cfg: RunConfig, key: str, stage: StageConfig, prev: StageConfig) -> None:
    growth = effective_growth(cfg, stage)
    try:
        op = get_operator(growth.operator or "")
    except GrowthError as e:
        raise ConfigError(f"{key}.growth.operator", str(e).split(": ", 1)[1]) from None
    old = stage_spec(cfg, prev, 1)
    # growth runs at the old RoPE scaling; a change of scaling is a separate, reported step
    new = dataclasses.replace(stage_spec(cfg, stage, 1), **old.rope_scaling())
    if old == new:
        return  # no shape change: the stage only changes tokens, batch, context, positions or data
    fields = {"head_dim": "shape.heads", "hidden": "shape.hidden", "layers": "shape.layers",
              "ffn": "shape.ffn", "heads": "shape.heads", "kv_heads": "shape.kv_heads",
              "layer_insert": "growth.layer_insert", "init": "growth.init", "moments": "growth.moments",
              "operator": "growth.operator"}
    try:
        op.check(old, new, growth.layer_insert or "append", growth.init, growth.moments)
    except GrowthError as e:
        msg = str(e).split(": ", 1)[1]
        if e.field == "head_dim":
            msg = (f"head_dim = hidden / heads must stay {old.head_dim} across growth "
                   f"(got {new.head_dim}); grow heads with hidden")
        raise ConfigError(f"{key}.{fields.get(e.field, e.field)}", msg) from None
    if growth.ramp_steps is None or growth.ramp_steps < 0:
        raise ConfigError(f"{key}.growth.ramp_steps", "must be >= 0")
    if op.uses_masks:  # msg at ramp_steps=0 would put its new weights live at once
        try:
            op.check_ramp_steps(growth.ramp_steps)
        except GrowthError as e:
            raise ConfigError(f"{key}.growth.ramp_steps", str(e).split(": ", 1)[1]) from None
    if growth.ramp_steps >= stage_steps(stage):
        raise ConfigError(f"{key}.growth.ramp_steps",
                          f"{growth.ramp_steps} must be below the stage's {stage_steps(stage)} steps "
                          "so the masks are gone before the next growth")
    _positive(f"{key}.growth.tolerance", growth.tolerance)
    _positive(f"{key}.growth.tolerance_bf16", growth.tolerance_bf16)


def _check_ratios(key: str, ratios: dict, sources) -> None:
    try:
        check_ratios(ratios, sources, what=key)
    except DataError as e:
        message = str(e).removeprefix(f"{key}: ")
        raise ConfigError(f"{key}.{e.key}" if e.key else key, message) from None


def _check_data(cfg: RunConfig) -> None:
    d = cfg.data
    _choice("data.tokenizer.kind", d.tokenizer.kind, ("byte", "bpe"))
    _positive("data.tokenizer.vocab_size", d.tokenizer.vocab_size)
    _positive("data.tokenizer.train_chars", d.tokenizer.train_chars)
    if d.tokenizer.kind == "bpe" and d.tokenizer.vocab_size < 300:
        raise ConfigError("data.tokenizer.vocab_size", "a BPE needs >= 300 (256 bytes + merges)")
    if not 0 < d.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    if not d.sources:
        raise ConfigError("data.sources", "needs at least one source")
    if d.tokenizer.train_mix:
        _check_ratios("data.tokenizer.train_mix", d.tokenizer.train_mix, d.sources)
    for name, src in d.sources.items():
        key = f"data.sources.{name}"
        if not SOURCE_NAME.fullmatch(name):
            raise ConfigError(key, "a source name is letters, digits, '_', '-' or '.' (it names "
                                   "metrics: val/<source>/loss)")
        _choice(f"{key}.kind", src.kind, SOURCE_KINDS)
        _choice(f"{key}.format", src.format, ("auto", "text", "jsonl"))
        if src.kind == "files":
            if not src.paths:
                raise ConfigError(f"{key}.paths", "a files source needs at least one file or directory")
            for j, p in enumerate(src.paths):
                path = Path(p).expanduser()
                if not path.exists():
                    raise ConfigError(f"{key}.paths.{j}", f"{p} does not exist")
                if not os.access(path, os.R_OK):
                    raise ConfigError(f"{key}.paths.{j}", f"{p} is not readable")


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "databricks")


def _check_rest(cfg: RunConfig) -> None:
    t = cfg.train
    for f in ("beta1", "beta2"):
        if not 0 <= getattr(t, f) < 1:
            raise ConfigError(f"train.{f}", f"must be in [0, 1), got {getattr(t, f)}")
    for f in ("weight_decay", "grad_clip"):
        _positive(f"train.{f}", getattr(t, f), allow_zero=True)
    for f in ("eps", "eval_every_steps", "eval_batches", "log_every_steps"):
        _positive(f"train.{f}", getattr(t, f))
    _positive("checkpoint.every_steps", cfg.checkpoint.every_steps)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _choice("engine.name", cfg.engine.name, tuple(ENGINES))
    if cfg.engine.zero_stage == 3:
        raise ConfigError("engine.zero_stage", "3 is not supported: engine=deepspeed reads and writes the "
                                               "canonical checkpoint through ZeRO-1/2 partitions; use 1 "
                                               "(any layout) or 2 (stages with layout.pp=1)")
    _choice("engine.zero_stage", str(cfg.engine.zero_stage), ("1", "2"))
    _positive("engine.timeout_s", cfg.engine.timeout_s)
    kind = engine_kind(cfg.engine.name)
    _choice("engine.device", cfg.engine.device, kind.devices)
    _choice("engine.dtype", cfg.engine.dtype, kind.dtypes)
    _positive("engine.threads", cfg.engine.threads)
    _positive("cluster.usd_per_gpu_hour", cfg.cluster.usd_per_gpu_hour, allow_zero=True)
    _positive("cluster.peak_tflops_per_gpu", cfg.cluster.peak_tflops_per_gpu)
    if cfg.tracking.uri is not None:
        scheme = cfg.tracking.uri.split(":", 1)[0].split("+", 1)[0] if ":" in cfg.tracking.uri else ""
        if scheme not in TRACKING_SCHEMES:
            raise ConfigError("tracking.uri", f"{cfg.tracking.uri!r} has no supported scheme; "
                                              f"allowed: {', '.join(TRACKING_SCHEMES)}")
    _positive("tracking.flush_every_s", cfg.tracking.flush_every_s)
    for f in ("max_usd", "max_flops", "max_tokens"):
        _positive(f"budget.{f}", getattr(cfg.budget, f))
    _check_cluster_budget_plan(cfg)


def _check_cluster_budget_plan(cfg: RunConfig) -> None:
    c, b, p = cfg.cluster, cfg.budget, cfg.plan
    for f in ("gpus", "gpus_per_node", "gpu_memory_gb", "storage_gbps"):
        _positive(f"cluster.{f}", getattr(c, f))
    if not 0 < c.expected_mfu <= 1:
        raise ConfigError("cluster.expected_mfu", f"must be in (0, 1], got {c.expected_mfu}")
    for name, tflops in c.achieved_tflops_per_gpu.items():
        _positive(f"cluster.achieved_tflops_per_gpu.{name}", tflops)
        if tflops > c.peak_tflops_per_gpu:
            raise ConfigError(f"cluster.achieved_tflops_per_gpu.{name}",
                              f"{tflops} is above cluster.peak_tflops_per_gpu={c.peak_tflops_per_gpu}")
    for i, frac in enumerate(b.warn_at):
        if not 0 < frac <= 1:
            raise ConfigError(f"budget.warn_at.{i}", f"must be a fraction in (0, 1], got {frac}")
    _positive("budget.project_after_steps", b.project_after_steps)
    _choice("plan.fit_rule", p.fit_rule, ("proportional",))
    _choice("plan.recompute", p.recompute, ("none", "selective", "full"))
    if p.loss_fit is not None:
        read_fit(p.loss_fit)  # a missing or foreign file is refused before anything runs


_SLURM_TIME = r"^(\d+-)?\d+(:\d{1,2}){0,2}$"


def _check_submit(cfg: RunConfig) -> None:
    """`submit` (grow submit) and `run.only_stage` (one stage per Slurm job)."""
    s = cfg.submit
    for f in ("nodes", "tasks_per_node", "cpus_per_task", "rdzv_port", "max_failures"):
        _positive(f"submit.{f}", getattr(s, f))
    _positive("submit.gpus_per_node", s.gpus_per_node, allow_zero=True)
    _positive("submit.signal_delay_s", s.signal_delay_s, allow_zero=True)
    if s.rdzv_port > 65535:
        raise ConfigError("submit.rdzv_port", f"{s.rdzv_port} is not a TCP port; allowed: 1..65535")
    _choice("submit.launcher", s.launcher, ("auto", "torchrun", "python"))
    if not re.match(_SLURM_TIME, s.time):
        raise ConfigError("submit.time", f"{s.time!r} is not a Slurm time; allowed: MM, HH:MM:SS, D-HH:MM:SS")
    if s.mem is not None and not re.match(r"^\d+[KMGT]?$", s.mem):
        raise ConfigError("submit.mem", f"{s.mem!r}; allowed: a number with K, M, G or T (e.g. 64G)")
    for key in ("extra_sbatch", "setup", "container"):
        for i, line in enumerate(getattr(s, key)):
            if "\n" in line:
                raise ConfigError(f"submit.{key}.{i}", "one line per entry (no newlines)")
    names = [st.name for st in cfg.schedule.stages]
    if cfg.run.only_stage is not None and cfg.run.only_stage not in names:
        raise ConfigError("run.only_stage", f"{cfg.run.only_stage!r} is not a stage; allowed: {', '.join(names)}")


def _check_init_from(cfg: RunConfig) -> None:
    if cfg.init_from is not None and not (Path(cfg.init_from).expanduser() / "manifest.json").exists():
        raise ConfigError("init_from", f"{cfg.init_from} is not a canonical checkpoint directory "
                                       "(no manifest.json); make one with `grow import-hf`")
    if cfg.init_from is not None:  # a run starts from the weights alone: masks below 1 would be lost
        try:
            masks = MaskState.from_dict(json.loads((Path(cfg.init_from).expanduser() / "meta.json").read_text())
                                        .get("masks"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # a damaged checkpoint is reported, by name, when the run reads it
        if masks is not None and not masks.done:
            raise ConfigError("init_from", f"{cfg.init_from} was grown with msg and its masks are still ramping "
                                           f"({masks.steps_done}/{masks.ramp_steps} steps); a run would start "
                                           "from its weights without the masks and so change its function: "
                                           "grow with msg inside the run (a stage shape larger than the "
                                           "checkpoint's), or offline with zero or clone")


def _check_budget_covers_a_step(cfg: RunConfig) -> None:
    """A cap below the first step would stop a run before it starts: refuse it here."""

    first = cfg.schedule.stages[0]
    tokens = tokens_of_steps(first, 1)
    if cfg.budget.max_tokens is not None and cfg.budget.max_tokens < tokens:
        raise ConfigError("budget.max_tokens", f"{cfg.budget.max_tokens} is below one step of stage "
                                               f"{first.name!r}; allowed: >= {tokens}")
    # vocabulary not known before the tokenizer: 256 (bytes) bounds the step's FLOPs below
    spec = stage_spec(cfg, first, cfg.model.vocab_size or 256)
    flops = flops_per_token(spec, step_seq_len(first, 0)) * tokens
    if cfg.budget.max_flops is not None and cfg.budget.max_flops < flops:
        raise ConfigError("budget.max_flops", f"{cfg.budget.max_flops:.4g} is below one step of stage "
                                              f"{first.name!r}; allowed: >= {flops:.4g}")


def _check_wsd_window(stages: list[StageConfig]) -> None:
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


def validate(cfg: RunConfig, planning: bool = False) -> RunConfig:
    """`planning`: for `grow plan`, which checks layouts against the cluster, not the engine."""
    _check_model(cfg)
    _check_data(cfg)
    _check_rest(cfg)
    _check_submit(cfg)
    stages = cfg.schedule.stages
    if not stages:
        raise ConfigError("schedule.stages", "needs at least one stage")
    names = [s.name for s in stages]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"schedule.stages.{i}.name", f"{name!r} is used by two stages")
    _check_parametrization(cfg)
    for i, stage in enumerate(stages):
        _check_stage(cfg, i, stage, stages[i - 1] if i else None)
    _check_wsd_window(stages)
    _check_budget_covers_a_step(cfg)
    _check_init_from(cfg)
    if not planning:
        engine_kind(cfg.engine.name).check_layouts(cfg)
    return cfg


def composition_error(e: Exception) -> ConfigError:
    """A Hydra/OmegaConf error from composing overrides, as a one-line ConfigError naming
    the key (and for an unknown key, the allowed ones)."""
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    key = key.replace("[", ".").replace("]", "") if key else None
    first = " ".join(str(cause).split()) or type(cause).__name__
    if key and ("not in struct" in first or re.search(r"Key '\w+' not in '\w+'", first)):
        allowed = allowed_keys(key)
        first = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    return ConfigError(key or "overrides", first.split(" full_key:")[0].split(" Config search path:")[0])


# OmegaConf raises bare AssertionError/AttributeError for some bad overrides (a key added
# under a null node); Hydra and OmegaConf raise their own for the rest.
COMPOSITION_ERRORS = (AssertionError, AttributeError)


def load_config(raw: DictConfig | dict, planning: bool = False, runs_here: bool = False) -> RunConfig:
    """Composed Hydra config (or plain dict) -> a validated `RunConfig`, or ConfigError.
    The data sources' files are checked too (their heads are read); `runs_here`: the run
    starts on this machine, so its paths, device and memory are checked against it."""
    if isinstance(raw, DictConfig):
        try:
            raw = OmegaConf.to_container(raw, resolve=True)
        except Exception as e:  # an interpolation that cannot resolve
            key = getattr(e, "full_key", None) or "config"
            raise ConfigError(str(key), str(e).splitlines()[0]) from None
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    cfg = validate(_build(RunConfig, raw, ""), planning)
    try:
        check_data_sources(cfg.data)
    except DataError as e:
        raise ConfigError(e.key or "data.sources", str(e)) from None
    if runs_here:
        check_runs_here(cfg)
    return cfg
