"""Where Slurm bookkeeping lives inside a run directory."""
from __future__ import annotations

import json
from pathlib import Path


def slurm_dir(run_dir) -> Path:
    return Path(run_dir) / "slurm"


def finished_flag(run_dir, index: int, name: str) -> Path:
    """Written by the runner when a stage's final checkpoint is complete; a job that finds it
    exits at once, so a requeued or resubmitted job never trains a finished stage again."""
    return Path(run_dir) / "finished" / f"{index}-{name}"


def jobs_file(run_dir) -> Path:
    return slurm_dir(run_dir) / "jobs.json"


def stage_state_file(run_dir, name: str) -> Path:
    return slurm_dir(run_dir) / "state" / f"{name}.json"


def read_json(path: Path, default):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def latest_meta(run_dir) -> dict | None:
    """meta.json of the newest complete checkpoint (json only: no torch import)."""
    root = Path(run_dir) / "checkpoints"
    pointer = read_json(root / "latest", None)
    if not pointer or "path" not in pointer:
        return None
    return read_json(root / pointer["path"] / "meta.json", None)
