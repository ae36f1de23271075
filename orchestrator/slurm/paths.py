"""Where Slurm bookkeeping lives inside a run directory."""
from __future__ import annotations

from pathlib import Path


def slurm_dir(run_dir) -> Path:
    return Path(run_dir) / "slurm"


def jobs_file(run_dir) -> Path:
    return slurm_dir(run_dir) / "jobs.json"


def stage_state_file(run_dir, name: str) -> Path:
    return slurm_dir(run_dir) / "state" / f"{name}.json"
