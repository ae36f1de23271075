"""Where a run directory's checkpoints live and which one `latest` names, torch-free, so
the job-side helpers (Slurm) can ask without importing torch.

`<run_dir>/checkpoints/<index>-<stage>/step_<NNNNNNNN>/`, and `<run_dir>/checkpoints/latest`
holding {"path": "<index>-<stage>/step_<NNNNNNNN>"}, replaced atomically and last.
"""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.atomic import read_json, write_json_atomic

LATEST = "latest"


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: Path, stage_index: int, stage_name: str, step: int) -> Path:
    return checkpoints_root(run_dir) / f"{stage_index}-{stage_name}" / f"step_{step:08d}"


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by stage index, then step)."""
    root = checkpoints_root(run_dir)
    found = []
    for stage_dir in root.glob("*-*"):
        idx = stage_dir.name.split("-", 1)[0]
        if not (stage_dir.is_dir() and idx.isdigit()):
            continue
        for ckpt in stage_dir.glob("step_*"):
            if ckpt.is_dir():
                found.append((int(idx), int(ckpt.name[5:]), ckpt))
    return [p for _, _, p in sorted(found)]


def pointed_at(root: Path) -> str | None:
    """The checkpoint `latest` names, relative to `root` (None: no pointer). A damaged
    pointer raises (ValueError, KeyError or TypeError): each caller decides what that means."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    return json.loads(pointer.read_text())["path"]


def set_latest(path: Path) -> None:
    """Point `latest` at checkpoint `path` (the last write of a save)."""
    root = Path(path).parents[1]
    write_json_atomic(root / LATEST, {"path": str(Path(path).relative_to(root))})


def latest_meta(run_dir) -> dict | None:
    """meta.json of the checkpoint `latest` points at, JSON only (the runner verifies the
    checkpoint's bytes before it resumes from it; bookkeeping needs only where it is)."""
    root = checkpoints_root(run_dir)
    pointer = read_json(root / LATEST)
    if not isinstance(pointer, dict) or "path" not in pointer:
        return None
    return read_json(root / pointer["path"] / "meta.json")
