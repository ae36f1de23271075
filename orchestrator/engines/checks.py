"""The engines' checks (registered with orchestrator.config.checks): the engine and its
options, whether it runs each stage's layout, and on the machine a run starts on, its
device and the memory one step of each stage needs."""
from __future__ import annotations

import os
import shutil

import psutil
import torch

from orchestrator.budget.memory import memory_problem, step_memory
from orchestrator.config.checks import check
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig
from orchestrator.engines.device import device_type
from orchestrator.engines.registry import engine_kind
from orchestrator.schedule import ResolvedStage, Schedule, max_seq_len


@check("settings")
def engine_options(schedule: Schedule) -> None:
    e = schedule.cfg.engine
    kind = engine_kind(e.name)  # an unknown name: "... is not allowed; allowed: local, deepspeed"
    if e.zero_stage == 3:
        raise ConfigError("engine.zero_stage", "3 is not supported: engine=deepspeed reads and writes the "
                                               "canonical checkpoint through ZeRO-1/2 partitions; use 1 "
                                               "(any layout) or 2 (stages with layout.pp=1)")
    if e.zero_stage not in (1, 2):
        raise ConfigError("engine.zero_stage", f"'{e.zero_stage}' is not allowed; allowed: 1, 2")
    for key, value, allowed in (("device", e.device, kind.devices), ("dtype", e.dtype, kind.dtypes)):
        if value not in allowed:
            raise ConfigError(f"engine.{key}", f"{value!r} is not allowed; allowed: {', '.join(allowed)}")


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


@check("settings")
def compile_options(schedule: Schedule) -> None:
    """train.compile_mode: CUDA-graph modes need a GPU and the local engine (DeepSpeed's
    pipeline reuses its buffers across steps, which CUDA graphs would capture)."""
    cfg = schedule.cfg
    mode = cfg.train.compile_mode
    if not cfg.train.compile or mode not in CUDA_GRAPH_MODES:
        return
    if cfg.engine.device == "cpu":
        raise ConfigError("train.compile_mode", f"{mode!r} captures CUDA graphs: not on engine.device=cpu; "
                                                "allowed there: default, max-autotune-no-cudagraphs")
    if cfg.engine.name != "local":
        raise ConfigError("train.compile_mode", f"{mode!r} captures CUDA graphs: engine.name={cfg.engine.name} "
                                                "runs default or max-autotune-no-cudagraphs")


@check("layouts")
def engine_runs_layouts(schedule: Schedule) -> None:
    engine_kind(schedule.cfg.engine.name).check_layouts(schedule.cfg)


@check("machine")
def device_and_memory(schedule: Schedule) -> None:
    """A requested GPU is there, and one step of every stage (of run.only_stage's, when set)
    fits in this machine's memory."""
    cfg = schedule.cfg
    if cfg.engine.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device", "cuda, but no CUDA device is visible on this machine; "
                                           "allowed here: cpu, auto")
    if cfg.train.compile and device_type(cfg.engine.device) == "cpu":
        cxx = os.environ.get("CXX", "g++")  # what torch inductor builds CPU kernels with
        if shutil.which(cxx) is None:
            raise ConfigError("train.compile", f"true, but there is no C++ compiler ({cxx}) on this machine to "
                                               "build the CPU kernels; install g++ (or set CXX), or compile=false")
        if cfg.train.compile_mode in CUDA_GRAPH_MODES:
            raise ConfigError("train.compile_mode", f"{cfg.train.compile_mode!r} captures CUDA graphs: no GPU here; "
                                                    "allowed: default, max-autotune-no-cudagraphs")
    states_dtype = cfg.engine.dtype if engine_kind(cfg.engine.name).bf16_weights else "fp32"
    for stage in schedule:
        if cfg.run.only_stage not in (None, stage.name):
            continue
        limit, where, device = _memory_limit(cfg, stage)
        s = stage.config
        need = step_memory(stage.spec, s.layout, s.batch_size, max_seq_len(s), cfg.engine.dtype, states_dtype)
        problem = memory_problem(f"schedule.stages.{stage.index}", need, limit, where, cfg.engine.dtype, device)
        if problem:
            raise ConfigError(*problem)


def _memory_limit(cfg: RunConfig, stage: ResolvedStage) -> tuple[float, str, str]:
    """(bytes one rank of `stage` may use, what that is, the device word) on this machine:
    a GPU each, or the RAM shared by the stage's ranks (all here, unless a launcher says
    how many are on this node)."""
    if cfg.engine.device == "cuda" or (cfg.engine.device == "auto" and torch.cuda.is_available()):
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        return props.total_memory, f"this GPU's memory ({props.name})", "GPU"
    ranks = stage.world if engine_kind(cfg.engine.name).multi_rank else 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    share = f" shared by {ranks} ranks" if ranks > 1 else ""
    return psutil.virtual_memory().total / ranks, f"this machine's RAM{share}", "process"
