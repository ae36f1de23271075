"""A checkpoint whose manifest agrees with it but which does not load (a wrong tensor-to-file
mapping in an index, an index naming a missing shard, a truncated index or shard header, a
meta.json with a wrong step or a missing key, a `latest` naming nothing) is skipped like a
checksum failure: the rerun resumes from the previous complete checkpoint and ends where an
undamaged run ends. With no complete checkpoint left the run stops with one line naming it.

The damage (tests/checkpoint/damage.py) is applied to a copy of one finished stage whose final
checkpoint was rewritten as the sharded, indexed checkpoint a multi-rank engine writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator.checkpoint.canonical import latest_checkpoint

from ..checkpoint.damage import DAMAGE, damage, shard
from ..conftest import read_summary
from .conftest import run_forked

pytestmark = pytest.mark.slow

ONE_STAGE = ("run.only_stage=s1",)  # checkpoints at steps 27, 30 and the final 32 stay
FINAL, PREVIOUS = "step_00000032", "step_00000030"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_cache) -> Path:
    """Stage s1 run to its end (made once); its final checkpoint sharded and indexed."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_forked(run_dir, data_cache, extra=ONE_STAGE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = run_dir / "checkpoints" / "0-s1" / FINAL
    shard(final)
    assert latest_checkpoint(run_dir) == final  # the sharded form is a good checkpoint
    return run_dir


def _damaged_copy(finished: Path, run_dir: Path, kind: str) -> Path:
    shutil.copytree(finished, run_dir)
    final = run_dir / "checkpoints" / "0-s1" / FINAL
    damage(final, kind)
    return final


def _final_weights(run_dir: Path) -> dict:
    weights = {}
    for f in sorted((run_dir / "checkpoints" / "0-s1" / FINAL).glob("model*.safetensors")):
        weights.update(load_file(f))
    return weights


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_checkpoint_that_does_not_load_falls_back_to_the_previous_one(kind, tmp_path, data_cache, finished):
    run_dir = tmp_path / "run"
    _damaged_copy(finished, run_dir, kind)
    proc = run_forked(run_dir, data_cache, extra=ONE_STAGE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "damaged checkpoint skipped" in out and f"0-s1/{FINAL}" in out, out[-2000:]
    assert f"resuming stage s1 at step 30 from {run_dir / 'checkpoints' / '0-s1' / PREVIOUS}" in out
    want, got = read_summary(finished)["stages"][0], read_summary(run_dir)["stages"][0]
    assert got["val_loss"] == want["val_loss"] and got["steps"] == want["steps"] == 32
    expected = _final_weights(finished)
    assert all(t.equal(expected[k]) for k, t in _final_weights(run_dir).items())


def test_latest_naming_a_missing_checkpoint_falls_back_to_the_newest(tmp_path, data_cache, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "checkpoints" / "latest").write_text(json.dumps({"path": "0-s1/step_00000099"}))
    proc = run_forked(run_dir, data_cache, extra=ONE_STAGE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "step_00000099, which does not exist" in out
    assert "stage s1 of" in out and "already finished" in out  # from the newest complete one, the final


def test_damaged_only_checkpoint_stops_with_one_line_naming_it(tmp_path, data_cache, finished):
    run_dir = tmp_path / "run"
    final = _damaged_copy(finished, run_dir, "model-index-wrong-mapping")
    for older in final.parent.glob("step_*"):
        if older != final:
            shutil.rmtree(older)
    proc = run_forked(run_dir, data_cache, extra=ONE_STAGE)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("grow:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert f"0-s1/{FINAL}/model.safetensors.index.json maps 'embed.weight'" in lines[0]
    assert "restore a checkpoint from a copy, or pass checkpoint.allow_fresh_start=true" in lines[0]
    assert "Traceback" not in proc.stderr and "run the same command again" not in proc.stdout + proc.stderr
