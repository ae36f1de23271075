"""What only the machine a run starts on can tell: its paths, tracking store, device and
memory per step. `grow run` checks these before anything is written; writes nothing."""
from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

from orchestrator.budget.memory import memory_problem, step_memory
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig, StageConfig
from orchestrator.engines.registry import engine_kind
from orchestrator.schedule import layout_world, max_seq_len, padded_vocab, stage_spec, tokenizer_vocab
from orchestrator.tracking.mlflow_tracker import sqlite_path


def _check_creatable_dir(key: str, given: str) -> None:
    """`given` is a directory, or can be made one: its nearest existing ancestor is a
    writable directory (not a regular file)."""
    path = Path(given).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"is under a file ({probe})"
        raise ConfigError(key, f"{given} {where}, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK) and probe != path:
        raise ConfigError(key, f"{given} cannot be created: {probe} is not writable")


def _check_tracking_store(cfg: RunConfig) -> None:
    """A local store (sqlite:///path, file:path) whose directory is missing would fail at
    the first metric; an unreachable server is an outage the run survives, not checked."""
    uri = cfg.tracking.uri
    if not cfg.tracking.enabled or uri is None:
        return
    if uri.startswith("sqlite:"):
        db = sqlite_path(uri)
        if db is None:
            raise ConfigError("tracking.uri", "a sqlite store needs a file: sqlite:///relative/path.db or "
                                              "sqlite:////absolute/path.db")
        if not db.expanduser().absolute().parent.is_dir():
            raise ConfigError("tracking.uri", f"the directory of {db} does not exist")
        if db.is_dir():
            raise ConfigError("tracking.uri", f"{db} is a directory, not a database file")
    elif uri.startswith("file:"):
        _check_creatable_dir("tracking.uri", uri[len("file:"):].removeprefix("//"))


def _memory_limit(cfg: RunConfig, stage: StageConfig) -> tuple[float, str, str]:
    """(bytes one rank of `stage` may use, what that is, the device word) on this machine:
    a GPU each, or the RAM shared by the stage's ranks (all here, unless a launcher says
    how many are on this node)."""
    if cfg.engine.device == "cuda" or (cfg.engine.device == "auto" and torch.cuda.is_available()):
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        return props.total_memory, f"this GPU's memory ({props.name})", "GPU"
    ranks = layout_world(stage.layout) if engine_kind(cfg.engine.name).multi_rank else 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    share = f" shared by {ranks} ranks" if ranks > 1 else ""
    return psutil.virtual_memory().total / ranks, f"this machine's RAM{share}", "process"


def check_runs_here(cfg: RunConfig) -> None:
    """What only this machine can tell: the run and cache directories can be created, the
    tracking store's directory exists, a requested GPU is there, and one step of every stage
    (of run.only_stage's, when set) fits in its memory. Writes nothing."""
    _check_creatable_dir("hydra.run.dir", cfg.run_dir)  # where `grow run` takes run_dir from
    _check_creatable_dir("data.cache_dir", cfg.data.cache_dir)
    _check_tracking_store(cfg)
    if cfg.engine.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device", "cuda, but no CUDA device is visible on this machine; "
                                           "allowed here: cpu, auto")
    vocab = padded_vocab(cfg, tokenizer_vocab(cfg))
    states_dtype = cfg.engine.dtype if engine_kind(cfg.engine.name).bf16_weights else "fp32"
    for i, stage in enumerate(cfg.schedule.stages):
        if cfg.run.only_stage not in (None, stage.name):
            continue
        limit, where, device = _memory_limit(cfg, stage)
        need = step_memory(stage_spec(cfg, stage, vocab), stage.layout, stage.batch_size,
                           max_seq_len(stage), cfg.engine.dtype, states_dtype)
        problem = memory_problem(f"schedule.stages.{i}", need, limit, where, cfg.engine.dtype, device)
        if problem:
            raise ConfigError(*problem)
