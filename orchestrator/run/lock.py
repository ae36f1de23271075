"""One `grow run` per run directory.

The lock is taken before anything is written into the directory (`grow run` takes it
before Hydra writes .hydra/ when hydra.run.dir is given; the runner takes it again, which
is a no-op in the same process). flock is released by the kernel when the holder dies, so
a killed run never leaves the directory stuck.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from orchestrator.config.errors import ConfigError

_held: dict[Path, list] = {}  # lock file -> [fd, depth] for locks this process holds
# Set while this process holds a lock, so the ranks it launches (torchrun children, which
# inherit the environment) know their run directory is already theirs.
HELD_BY_PARENT = "GROW_RUN_LOCK_HELD"


def first_rank() -> bool:
    """Not one of the other ranks of a multi-rank job (torchrun's RANK, plain srun's
    SLURM_PROCID): only the first rank locks the directory and writes the run's files."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = (Path(run_dir) / ".lock").resolve()

    def __enter__(self):
        if self.path in _held:
            _held[self.path][1] += 1
            return self
        if os.environ.get(HELD_BY_PARENT) == str(self.path):
            _held[self.path] = [None, 1]
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode().strip() or "?"
            os.close(fd)
            raise ConfigError("run_dir", f"{self.path.parent} is in use by another grow run "
                                         f"(pid {holder}); wait for it or pick another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _held[self.path] = [fd, 1]
        os.environ[HELD_BY_PARENT] = str(self.path)
        return self

    def __exit__(self, *exc):
        entry = _held[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.path]
            if entry[0] is not None:  # ours, not the parent's
                os.environ.pop(HELD_BY_PARENT, None)
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])
