"""A disk that fills up while a checkpoint is written: a clear error, the previous
checkpoint intact and usable, and the run resumes once there is space."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from orchestrator.checkpoint.canonical import latest_checkpoint, load_checkpoint

from .conftest import assert_same_as_reference, run_cmd, run_env

pytestmark = pytest.mark.slow
LIMIT = 1_600_000  # bytes: stage 1's checkpoints fit, the grown stage's do not


def _small_disk(path: Path):
    """A 1.6 MB tmpfs where we may mount (root), else a per-process file-size limit (a
    write past it fails with EFBIG, as a full quota would)."""
    path.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(path)],
                                            capture_output=True).returncode == 0:
        return (lambda: subprocess.run(["umount", "-l", str(path)], check=False)), None

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT // 2, LIMIT // 2))
    return (lambda: None), limit


def test_disk_full_during_checkpoint(tmp_path, data_cache, reference):
    disk = tmp_path / "disk"
    cleanup, preexec = _small_disk(disk)
    try:
        run_dir = disk / "run"
        proc = subprocess.run(run_cmd(run_dir, data_cache), env=run_env(), capture_output=True, text=True,
                              timeout=600, preexec_fn=preexec)
        assert proc.returncode == 1, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("grow: "), lines[-5:]
        assert ("No space left on device" in lines[-1]) or ("File too large" in lines[-1])
        assert "Traceback" not in proc.stderr
        assert not any(p.name.startswith(".") and ".tmp-" in p.name
                       for p in (run_dir / "checkpoints").rglob("*"))  # no partial files left
        good = latest_checkpoint(run_dir)
        assert good is not None
        load_checkpoint(good)  # intact: checksums verify and tensors load
        # with space again (the run directory moved to a normal disk) the run completes
        moved = tmp_path / "run"
        shutil.copytree(run_dir, moved)
    finally:
        cleanup()
    proc = subprocess.run(run_cmd(moved, data_cache), env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_as_reference(moved, reference)
