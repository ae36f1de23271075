"""What a 3D-parallel layout (Megatron tensor parallelism, DeepSpeed pipeline and ZeRO data
parallelism) must satisfy for a stage: checked for the deepspeed engine (orchestrator.engines)
and for any cluster a schedule is planned on (orchestrator.budget.planner)."""
from __future__ import annotations

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig


def check_parallel_layout(cfg: RunConfig, i: int) -> None:
    """What a TP/PP layout must divide: heads, kv heads, FFN and vocab by tp, layers by pp;
    also the previous stage's shape, which the growth check evaluates on this layout."""
    key = f"schedule.stages.{i}"
    stages = cfg.schedule.stages
    stage, lay = stages[i], stages[i].layout
    shapes = [("", stage.shape)] + ([(" (the previous stage's shape, which the growth check runs on "
                                      "this layout)", stages[i - 1].shape)] if i else [])
    for note, s in shapes:
        for f, v in (("heads", s.heads), ("kv_heads", s.kv_heads or s.heads), ("ffn", s.ffn)):
            if v % lay.tp:
                raise ConfigError(f"{key}.layout.tp", f"{lay.tp} does not divide {f}={v}{note}")
        if s.layers % lay.pp:
            raise ConfigError(f"{key}.layout.pp", f"{lay.pp} does not divide layers={s.layers}{note}")
    m = cfg.model
    if (m.vocab_size or m.vocab_multiple) % lay.tp:
        raise ConfigError(f"{key}.layout.tp", f"{lay.tp} does not divide the vocabulary "
                                              "(model.vocab_size, or model.vocab_multiple when null)")
    if lay.pp > 1 and cfg.engine.zero_stage > 1:
        raise ConfigError("engine.zero_stage", f"{cfg.engine.zero_stage} cannot run with a pipeline "
                                               f"({key}.layout.pp={lay.pp}): DeepSpeed's pipeline runs "
                                               "ZeRO-1 only; use engine.zero_stage=1, or pp=1 in every stage")
