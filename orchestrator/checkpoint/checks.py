"""The checkpoint a run starts from (`init_from`), checked before anything runs
(registered with orchestrator.config.checks): its tokenizer and vocabulary against the
run's, its architecture against model.*, its shape against stage 1's (the same, or grown
into with stage 1's operator). Each refusal names what to set (orchestrator.checkpoint.init_model)."""
from __future__ import annotations

import json
from pathlib import Path

from growth_ops import MaskState, ModelSpec

from orchestrator.checkpoint.init_model import (MODEL_KEYS, MOE_FIELDS, SHAPE_FIELDS, model_at_start, moe_override,
                                                override, shape_override)
from orchestrator.config.checks import check
from orchestrator.config.errors import ConfigError
from orchestrator.config.tokenizer_file import hf_vocab_digest
from orchestrator.schedule import ResolvedStage, Schedule, tokenizer_vocab
from orchestrator.schedule.checks import check_growth


@check("schedule")
def init_from(schedule: Schedule) -> None:
    given = schedule.cfg.init_from
    if given is None:
        return
    path = Path(given).expanduser()
    if not (path / "manifest.json").exists():
        raise ConfigError("init_from", f"{given} is not a canonical checkpoint directory "
                                       "(no manifest.json); make one with `grow import-hf`")
    try:  # a run starts from the weights alone: masks below 1 would be lost
        meta = json.loads((path / "meta.json").read_text())
        masks = MaskState.from_dict(meta.get("masks"))
        spec = ModelSpec.from_dict(meta["spec"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # a damaged checkpoint is reported, by name, when the run reads it
    _tokenizer(schedule, given, (meta.get("imported_from") or {}).get("tokenizer"))
    _vocabulary(schedule, given, spec.vocab)
    if masks is not None and not masks.done:
        raise ConfigError("init_from", f"{given} was grown with msg and its masks are still ramping "
                                       f"({masks.steps_done}/{masks.ramp_steps} steps); a run would start "
                                       "from its weights without the masks and so change its function: "
                                       "grow with msg inside the run (a stage shape larger than the "
                                       "checkpoint's), or offline with zero or clone")
    _architecture(schedule, given, spec)
    _first_shape(schedule, given, spec)


def _tokenizer(schedule: Schedule, given: str, imported: dict | None) -> None:
    """A model imported with its tokenizer (`grow import-hf` of a directory holding a
    tokenizer.json) reads only that tokenizer's ids: another tokenizer's, or bytes, would
    train it on ids that mean something else. Compared by size, then by which token has
    which id (an import that recorded it)."""
    if not imported:
        return
    t, own, ids = schedule.cfg.data.tokenizer, imported["file"], imported["ids"]
    if t.kind != "hf":
        raise ConfigError("data.tokenizer.kind", f"{t.kind}, but init_from {given} was imported with its own "
                                                 f"tokenizer ({own}, {ids} ids) and reads only its ids; set "
                                                 f"data.tokenizer.kind=hf data.tokenizer.path={Path(own).parent}")
    need = tokenizer_vocab(schedule.cfg)
    if need != ids:
        raise ConfigError("data.tokenizer.path", f"{t.path} has {need} ids, but init_from {given} was imported "
                                                 f"with {own} ({ids} ids): another vocabulary; set "
                                                 f"data.tokenizer.path={Path(own).parent}")
    try:
        digest = hf_vocab_digest(t.path)
    except (OSError, ValueError):
        return  # an unreadable tokenizer.json is the data check's to report
    if imported.get("digest") not in (None, digest):
        raise ConfigError("data.tokenizer.path", f"{t.path} has {need} ids like {own}, the tokenizer init_from "
                                                 f"{given} was imported with, but not the same tokens at "
                                                 f"those ids: another vocabulary; set "
                                                 f"data.tokenizer.path={Path(own).parent}")


def _vocabulary(schedule: Schedule, given: str, vocab: int) -> None:
    """The checkpoint's embedding rows must hold every id of the run's tokenizer; with an hf
    tokenizer (a fixed vocabulary, known now) they must be exactly the run's padded size."""
    t = schedule.cfg.data.tokenizer
    need = tokenizer_vocab(schedule.cfg)
    source = f"data.tokenizer.kind={t.kind}" + (f", {t.path}" if t.kind == "hf" else "")
    if vocab < need:
        raise ConfigError("init_from", f"{given} has {vocab} vocabulary rows, fewer than the tokenizer's {need} "
                                       f"ids ({source}): it was trained with another tokenizer; start from "
                                       "a checkpoint of this tokenizer's vocabulary")
    if t.kind == "hf" and vocab != schedule.vocab:
        raise ConfigError("init_from", f"{given} has {vocab} vocabulary rows, this run {schedule.vocab} (the "
                                       f"tokenizer's {need} ids ({source}) padded by model.vocab_size / "
                                       f"vocab_multiple); set model.vocab_size={vocab} to keep the checkpoint's rows")


def _architecture(schedule: Schedule, given: str, spec: ModelSpec) -> None:
    """model.* must be the checkpoint's: all differences in one line, with the overrides."""
    if spec.head_dim != spec.hidden // spec.heads:
        raise ConfigError("init_from", f"{given} has head_dim={spec.head_dim}, not hidden / heads = "
                                       f"{spec.hidden // spec.heads}: the model here always has head_dim = "
                                       "hidden / heads, so a run cannot start from it")
    if spec.rope_interpolation != 1.0:
        raise ConfigError("init_from", f"{given} runs RoPE with interpolation={spec.rope_interpolation:g}, and a "
                                       "run starts without interpolation, so it cannot start from it")
    run = model_at_start(schedule)
    differ = [f for f in MODEL_KEYS if getattr(spec, f) != getattr(run, f)]
    if differ:
        here = ", ".join(f"{override(MODEL_KEYS[f], getattr(run, f))}" for f in differ)
        raise ConfigError("init_from", f"{given} is another model than this run's ({here}); set "
                                       + " ".join(override(MODEL_KEYS[f], getattr(spec, f)) for f in differ))


def _first_shape(schedule: Schedule, given: str, spec: ModelSpec) -> None:
    """Stage 1 starts at the checkpoint's shape or grows into a larger one, by the rules
    between two stages (stage 1's growth settings)."""
    first = schedule[0]
    if all(getattr(spec, f) == getattr(first.spec, f) for f in SHAPE_FIELDS + MOE_FIELDS):
        return
    try:
        check_growth(ResolvedStage.alone(first.config, spec), first)
    except ConfigError as e:
        shape = " ".join(f"{f}={getattr(spec, f)}" for f in SHAPE_FIELDS + (MOE_FIELDS if spec.is_moe else ()))
        starts = " ".join([shape_override(spec), *([moe_override(spec)] if spec.is_moe else [])])
        raise ConfigError(e.key, f"{str(e).split(': ', 1)[1]}; init_from {given} is {shape}: stage 1 starts at "
                                 f"that shape ({starts}) or grows into a larger one") from None
