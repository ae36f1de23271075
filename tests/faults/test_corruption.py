"""Damaged checkpoints are detected by their checksums; the run falls back to the previous
good one, names the bad file, and never silently starts from scratch."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.checkpoint.canonical import all_checkpoints

from .conftest import assert_same_as_reference, run_forked

pytestmark = pytest.mark.slow


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "model-truncated": ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:100])),
    "optimizer-bitflip": ("optimizer.safetensors", _flip),
    "meta-edited": ("meta.json", lambda f: f.write_text(f.read_text().replace('"step": 18', '"step": 19'))),
    "meta-deleted": ("meta.json", Path.unlink),
    "manifest-garbage": ("manifest.json", lambda f: f.write_text("{not json")),
    "model-emptied": ("model.safetensors", lambda f: f.write_bytes(b"")),
}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, data_cache) -> Path:
    """A run killed after step 20 of stage 1 (made once; each test damages its own copy)."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = run_forked(run_dir, data_cache, "step.done@20")
    assert proc.returncode == -9
    return run_dir


def _killed_mid_stage(run_dir: Path, killed_run: Path) -> Path:
    """A copy of `killed_run` at `run_dir`: its newest checkpoint is step 18."""
    shutil.copytree(killed_run, run_dir)
    newest = all_checkpoints(run_dir)[-1]
    assert newest.name == "step_00000018"
    return newest


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_warning(kind, tmp_path, data_cache, reference, killed_run):
    run_dir = tmp_path / "run"
    newest = _killed_mid_stage(run_dir, killed_run)
    name, damage = DAMAGE[kind]
    damage(newest / name)
    proc = run_forked(run_dir, data_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "damaged checkpoint skipped" in out and "step_00000018" in out
    assert "resuming stage s1 at step 15" in out  # the previous good one
    assert_same_as_reference(run_dir, reference)


def test_no_intact_checkpoint_refuses_to_start_over(tmp_path, data_cache, reference, killed_run):
    run_dir = tmp_path / "run"
    _killed_mid_stage(run_dir, killed_run)
    for ckpt in all_checkpoints(run_dir):
        _flip(ckpt / "model.safetensors")
    (run_dir / "checkpoints" / "latest").write_text("garbage")
    proc = run_forked(run_dir, data_cache)
    assert proc.returncode == 1
    assert "refusing to start from scratch" in proc.stderr
    assert "checkpoint.allow_fresh_start=true" in proc.stderr
    # asked explicitly, it starts over and reaches the same result
    proc = run_forked(run_dir, data_cache, extra=("checkpoint.allow_fresh_start=true",))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_as_reference(run_dir, reference)
