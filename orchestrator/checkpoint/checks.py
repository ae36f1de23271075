"""The checkpoint a run starts from (`init_from`), checked before anything runs
(registered with orchestrator.config.checks)."""
from __future__ import annotations

import json
from pathlib import Path

from growth_ops import MaskState

from orchestrator.config.checks import check
from orchestrator.config.errors import ConfigError
from orchestrator.schedule import Schedule, tokenizer_vocab


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
        vocab = int(meta["spec"]["vocab"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # a damaged checkpoint is reported, by name, when the run reads it
    _vocabulary(schedule, given, vocab)
    if masks is not None and not masks.done:
        raise ConfigError("init_from", f"{given} was grown with msg and its masks are still ramping "
                                       f"({masks.steps_done}/{masks.ramp_steps} steps); a run would start "
                                       "from its weights without the masks and so change its function: "
                                       "grow with msg inside the run (a stage shape larger than the "
                                       "checkpoint's), or offline with zero or clone")


def _vocabulary(schedule: Schedule, given: str, vocab: int) -> None:
    """The checkpoint's embedding rows must hold every id of the run's tokenizer; with an hf
    tokenizer (a fixed vocabulary, known now) they must be exactly the run's padded size."""
    t = schedule.cfg.data.tokenizer
    need = tokenizer_vocab(schedule.cfg)
    if vocab < need:
        raise ConfigError("init_from", f"{given} has {vocab} vocabulary rows, fewer than the tokenizer's {need} "
                                       f"ids (data.tokenizer.kind={t.kind}): it was trained with another "
                                       "tokenizer; start from a checkpoint of this tokenizer's vocabulary")
    if t.kind == "hf" and vocab != schedule.vocab:
        raise ConfigError("init_from", f"{given} has {vocab} vocabulary rows, this run {schedule.vocab} (the "
                                       f"tokenizer's {need} ids padded by model.vocab_size / vocab_multiple); "
                                       f"set model.vocab_size={vocab} to keep the checkpoint's rows")
