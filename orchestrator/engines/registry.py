"""Engines by name, with what each can do declared up front.

The descriptors here import neither torch nor DeepSpeed, so validation and planning can ask
an engine what it runs (layouts, devices, dtypes, whether it runs many ranks) without
loading it; `EngineKind.create` imports the implementation only when a stage is built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig
from orchestrator.engines.host_memory import return_freed_tensors_to_the_os
from orchestrator.schedule.layout import check_parallel_layout

if TYPE_CHECKING:
    from orchestrator.engines.base import Engine
    from orchestrator.schedule import ResolvedStage


def _single_device_layout(cfg: RunConfig, i: int) -> None:
    lay = cfg.schedule.stages[i].layout
    if (lay.tp, lay.pp, lay.dp) != (1, 1, 1):
        raise ConfigError(f"schedule.stages.{i}.layout", f"engine.name={cfg.engine.name} runs tp=pp=dp=1, "
                                                          f"got tp={lay.tp} pp={lay.pp} dp={lay.dp}")


@dataclass(frozen=True)
class EngineKind:
    name: str
    implementation: str  # "module:Class"
    multi_rank: bool  # one process per device, started by torchrun or srun (one launch per stage)
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    bf16_weights: bool  # engine.dtype=bf16 keeps bf16 weights (else fp32 weights under autocast)
    check_layout: Callable[[RunConfig, int], None]  # raises ConfigError naming the key

    def check_layouts(self, cfg: RunConfig) -> None:
        for i in range(len(cfg.schedule.stages)):
            self.check_layout(cfg, i)

    def create(self, cfg: RunConfig, stage: "ResolvedStage") -> "Engine":
        return_freed_tensors_to_the_os()  # before the engine holds a model: see host_memory.py
        module, cls = self.implementation.split(":")
        return getattr(importlib.import_module(module), cls)(cfg, stage)


ENGINES: dict[str, EngineKind] = {k.name: k for k in (
    EngineKind("local", "orchestrator.engines.local:LocalEngine", multi_rank=False,
               devices=("auto", "cpu", "cuda"), dtypes=("fp32", "bf16"), bf16_weights=False,
               check_layout=_single_device_layout),
    EngineKind("deepspeed", "orchestrator.engines.deepspeed_engine:DeepSpeedEngine", multi_rank=True,
               devices=("auto", "cpu", "cuda"), dtypes=("fp32", "bf16"), bf16_weights=True,
               check_layout=check_parallel_layout),
)}


def engine_kind(name: str) -> EngineKind:
    try:
        return ENGINES[name]
    except KeyError:
        raise ConfigError("engine.name", f"{name!r} is not allowed; allowed: {', '.join(ENGINES)}") from None
