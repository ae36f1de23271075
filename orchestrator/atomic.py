"""Crash-safe writes: temp file in the same directory, fsync, rename, fsync the directory.
Torch-free, so job-side helpers (Slurm) can use it without importing torch."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or keeps what it held: a temp name unique to this writer
    (concurrent writers of one file each publish a whole copy), fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


def read_json(path: Path, default=None):
    """A JSON file's content, or `default` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename a complete directory `tmp` to `path`; an existing `path` is swapped out only
    once the new one is in place, so a crash leaves one of the two whole."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
