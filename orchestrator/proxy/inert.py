"""Settings a run accepts but does not use, given the rest of its config: muP's multipliers
under the standard parametrization, RoPE's base under ALiBi, a stage's wsd decay window
anywhere but on the last stage under wsd. A single run may carry them (they would apply if
the rest changed); a sweep must not vary them, or members train the same model and a search
recommends a value that did nothing."""
from __future__ import annotations

from orchestrator.config.schema import RunConfig


def inert_settings(cfg: RunConfig) -> dict[str, str]:
    """Dotted key (a setting or a section) -> what makes it have no effect in `cfg` (read
    after "has no effect with ...")."""
    inert = {}
    if cfg.model.parametrization != "mup":
        inert["model.mup"] = (f"model.parametrization={cfg.model.parametrization} (muP's settings apply only "
                              "with model.parametrization=mup)")
    if cfg.model.position == "alibi":
        inert["model.rope_theta"] = "model.position=alibi (RoPE's base applies only with model.position=rope)"
    stages = cfg.schedule.stages
    for i, stage in enumerate(stages):
        if i != len(stages) - 1 or stage.lr.decay != "wsd":
            why = (f"schedule.stages.{i}.lr.decay={stage.lr.decay}" if stage.lr.decay != "wsd"
                   else f"lr.decay=wsd on stage {stage.name}, which is not the last (only the last stage "
                        "decays under wsd)")
            inert[f"schedule.stages.{i}.lr.decay_fraction"] = why
    return inert


def inert_reason(key: str, cfg: RunConfig) -> str | None:
    """Why the setting `key` (as an override names it) has no effect in `cfg`; None if it has."""
    key = key.lstrip("+~")
    for setting, why in inert_settings(cfg).items():
        if key == setting or key.startswith(setting + "."):
            return why
    return None
