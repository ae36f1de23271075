"""What a run directory says about its run: the settings it is pinned to (config.json) and
whether it ever wrote a checkpoint, so a resume neither changes what the run computes nor
silently starts over."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from orchestrator.atomic import write_json_atomic
from orchestrator.checkpoint.canonical import all_checkpoints
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig
from orchestrator.schedule import stage_steps
from orchestrator.secrets import redact_config
from orchestrator.tracking.report import MetricsLog

# Config sections that define what a run computes; a resume must not change them.
FIXED_ON_RESUME = ("seed", "init_from", "model", "schedule", "growth", "data", "train")


def _set(tree, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def checkpointed_before(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether this run directory's run ever wrote a checkpoint (even if none is left): it
    finished or stopped (summary.json), or it logged a step that comes only after one: past
    checkpoint.every_steps, or past the first stage (whose final checkpoint comes first). A
    run killed before its first checkpoint is not one of them: it may start over."""
    if (run_dir / "summary.json").exists():
        return True
    first = min(cfg.checkpoint.every_steps, stage_steps(cfg.schedule.stages[0]))
    return any(point["step"] > first for point in MetricsLog.read(run_dir / "metrics.jsonl"))


def pin_settings(run_dir: Path, cfg: RunConfig) -> None:
    """Record the run's settings in config.json, unless a run that trained pinned them."""
    check_same_run(run_dir, cfg)
    if not _pinned(run_dir):
        write_json_atomic(run_dir / "config.json", redact_config(dataclasses.asdict(cfg)))


def _pinned(run_dir: Path) -> bool:
    """A run that trained pins its settings; one that never got so far does not."""
    return (run_dir / "config.json").exists() and bool(
        all_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size)


def check_same_run(run_dir: Path, cfg: RunConfig) -> None:
    """A resume must not change what the run computes (read-only: `grow run` asks before
    Hydra writes anything). A directory whose run never trained does not pin its settings."""
    path = run_dir / "config.json"
    # compared as written: with secrets masked (config.json never holds them)
    current = {k: v for k, v in redact_config(dataclasses.asdict(cfg)).items() if k in FIXED_ON_RESUME}
    if not _pinned(run_dir):
        return
    try:
        saved = {k: v for k, v in json.loads(path.read_text()).items() if k in FIXED_ON_RESUME}
    except ValueError as e:
        raise ConfigError("run_dir", f"{path} is damaged ({e}); it records the settings of the run in "
                                     f"{run_dir} - restore it, or use another hydra.run.dir") from None

    def diff(a, b, key=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                found = diff(a.get(k), b.get(k), f"{key}.{k}".lstrip("."))
                if found:
                    return found
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                found = diff(x, y, f"{key}.{i}")
                if found:
                    return found
        elif a != b:
            return key, a, b
        return None

    found = diff(saved, current)
    while found and re.fullmatch(r"schedule\.stages\.\d+\.layout(\..*)?", found[0]):
        # a layout may change on resume (e.g. fewer GPUs after a requeue): the canonical
        # checkpoint and the global data cursor do not depend on it
        _set(saved, found[0], found[2])
        found = diff(saved, current)
    if found:
        key, old, new = found
        raise ConfigError(key, f"differs from the run already in {run_dir} ({old!r} -> {new!r}); "
                               "resume with the same settings or use another hydra.run.dir")
