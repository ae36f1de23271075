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
    def __init__(self, run_dir: Path, setting: str = "hydra.run.dir"):
        self.path = (Path(run_dir) / ".lock").resolve()
        self.setting = setting  # where the user chose the directory (a sweep's: hydra.sweep.dir)

    def __enter__(self):
        # the directory entered last is the one the ranks launched now work in (a sweep holds
        # its own directory and each member's); the one before is put back on exit
        self._env_before = os.environ.get(HELD_BY_PARENT)
        if self.path in _held:
            _held[self.path][1] += 1
            os.environ[HELD_BY_PARENT] = str(self.path)
            return self
        if self._env_before == str(self.path):
            _held[self.path] = [None, 1]
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode().strip() or "?"
            os.close(fd)
            key = "run_dir" if self.setting == "hydra.run.dir" else self.setting
            raise ConfigError(key, f"{self.path.parent} is in use by another grow run "
                                   f"(pid {holder}); wait for it or pick another {self.setting}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _held[self.path] = [fd, 1]
        os.environ[HELD_BY_PARENT] = str(self.path)
        return self

    def __exit__(self, *exc):
        entry = _held[self.path]
        entry[1] -= 1
        if self._env_before is None:
            os.environ.pop(HELD_BY_PARENT, None)
        else:
            os.environ[HELD_BY_PARENT] = self._env_before
        if entry[1] == 0:
            del _held[self.path]
            if entry[0] is not None:  # ours, not the parent's
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])
