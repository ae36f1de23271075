"""One run directory's checkpoints behind one object: where they go, saving (one process,
or many ranks each writing its share), opening, the newest intact one, the staging of a
grown step-0 checkpoint and its publication, and retention.

The format itself (safetensors files, manifest, atomic rename, `latest` moved last) is
`canonical`'s, `sharded`'s and `grown`'s; the runner, the stage loop and the growth
transition reach it only through a `Checkpointer`.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from orchestrator.checkpoint.canonical import (LazyTensors, all_checkpoints, checkpoint_dir, latest_checkpoint,
                                               open_checkpoint, open_tensors, prune, read_meta, save_checkpoint,
                                               seal_and_publish)
from orchestrator.checkpoint.grown import write_grown_shares, writer_seconds
from orchestrator.checkpoint.sharded import save_sharded_checkpoint


class Writers(Protocol):
    """How one rank of a multi-rank engine takes part in a write (an engine's `ShardRole`):
    its file index (None: writes nothing) of `count`, whether it publishes, the barrier."""

    index: int | None
    count: int
    leader: bool
    barrier: Callable[[], None]


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint's tensors, opened lazily (read tensor by tensor, or slice by slice), and
    its meta.json (None: staged files, not sealed yet)."""

    path: Path
    weights: LazyTensors
    moments: dict[str, LazyTensors]
    meta: dict | None


class Checkpointer:
    """The checkpoints of `run_dir`, keeping the newest `keep` mid-stage ones per stage
    (stage-final ones always stay). `check_meta`: how the run reads a meta.json (raising
    KeyError, TypeError or ValueError on one it cannot resume from), so `latest` skips it."""

    def __init__(self, run_dir: Path, keep: int, check_meta: Callable[[dict], object] | None = None):
        self.run_dir, self.keep, self.check_meta = Path(run_dir), keep, check_meta

    def path(self, stage_index: int, stage_name: str, step: int) -> Path:
        return checkpoint_dir(self.run_dir, stage_index, stage_name, step)

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return all_checkpoints(self.run_dir)

    def latest(self, damaged: list[str] | None = None) -> Path | None:
        """The newest checkpoint that verifies and loads (`latest` first; see
        `canonical.latest_checkpoint`); what was skipped is logged and appended to `damaged`."""
        return latest_checkpoint(self.run_dir, damaged, self.check_meta)

    @staticmethod
    def read_meta(path: Path) -> dict:
        return read_meta(path)

    @staticmethod
    def open(path: Path, check: bool = False) -> OpenedCheckpoint:
        """Any canonical checkpoint (this run's, or one to start from), nothing read yet.
        `check` hashes every file against the manifest first; a run skips it for what it has
        just verified (`latest`) or sealed itself: at scale hashing on every rank costs more
        than the reads."""
        weights, moments, meta = open_checkpoint(Path(path), check=check)
        return OpenedCheckpoint(Path(path), weights, moments, meta)

    @staticmethod
    def open_staged(staged: Path) -> OpenedCheckpoint:
        """The tensors `stage_grown` wrote, before they are sealed: the ranks load from them."""
        weights, moments = open_tensors(staged)
        return OpenedCheckpoint(Path(staged), weights, moments, None)

    def save(self, path: Path, weights: Mapping, moments: dict, meta: dict, writers: Writers | None = None) -> bool:
        """Write checkpoint `path` and move `latest` to it; True where this process published it
        (it then prunes the stage's older ones). With `writers` the save is collective: every
        rank calls it with its share of full tensors (maybe empty), nothing gathered."""
        if writers is None:
            save_checkpoint(path, weights, moments, meta)
        else:
            save_sharded_checkpoint(path, weights, moments, meta, writers)
            if not writers.leader:
                return False
        prune(Path(path).parent, self.keep)
        return True

    def stage_grown(self, path: Path, writers: Writers | None, names: Collection[str] | None, **grow) -> Path:
        """Collective (see `save`): the grown tensor files of checkpoint `path`, each writer
        growing `names` (None: all) into its own file, in a staging dir (returned) that no
        reader lists until `publish`. `grow`: `grown.write_grown`'s options."""
        return write_grown_shares(path, writers, names, **grow)

    @staticmethod
    def staged_seconds(staged: Path) -> dict[str, dict]:
        """Per writer of staged files: seconds spent reading, growing, writing, hashing and
        syncing them (before `publish`, which removes the records they come from)."""
        return writer_seconds(staged)

    @staticmethod
    def publish(staged: Path, path: Path, meta: dict) -> Path:
        """Seal staged files as checkpoint `path` (meta, manifest from the digests the writers
        took while writing, rename) and move `latest`."""
        return seal_and_publish(staged, path, meta)

    @staticmethod
    def discard(staged: Path) -> None:
        """Remove staged files that will never be published."""
        shutil.rmtree(staged, ignore_errors=True)

    def prune(self, stage_dir: Path) -> None:
        prune(stage_dir, self.keep)
