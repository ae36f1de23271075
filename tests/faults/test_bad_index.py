"""A checkpoint whose manifest agrees with it but which does not load (a wrong tensor-to-file
mapping in an index, an index naming a missing shard, a truncated index or shard header, a
meta.json with a wrong step or a missing key, a `latest` naming nothing) is skipped like a
checksum failure: the rerun resumes from the previous complete checkpoint and ends where an
undamaged run ends. With no complete checkpoint left the run stops with one line naming it.

Damage is plain file edits on a copy of one finished stage, then the manifest is sealed over
it again (`write_manifest`), as a damaged writer or a hand edit would leave it. The stage's
final checkpoint is first rewritten as the sharded, indexed checkpoint a multi-rank engine
writes (same tensors, split over two files by name), so the index has something to get wrong.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from orchestrator.checkpoint.canonical import (KINDS, index_name, latest_checkpoint, shard_name, write_indexes,
                                               write_manifest)

from ..conftest import read_summary
from .conftest import run_forked

pytestmark = pytest.mark.slow

ONE_STAGE = ("run.only_stage=s1",)  # checkpoints at steps 27, 30 and the final 32 stay
FINAL, PREVIOUS = "step_00000032", "step_00000030"


def _shard(ckpt: Path, count: int = 2) -> None:
    """Rewrite `ckpt`'s tensor files as `count` shards of each kind with their indexes."""
    for kind in KINDS:
        tensors = load_file(ckpt / f"{kind}.safetensors")
        names = sorted(tensors)
        for i in range(count):
            save_file({n: tensors[n] for n in names[i::count]}, ckpt / shard_name(kind, i, count))
        (ckpt / f"{kind}.safetensors").unlink()
    write_indexes(ckpt)
    write_manifest(ckpt)


def _edit_json(f: Path, edit) -> None:
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))


def _remap(kind: str, tensor: str):
    """The index of `kind` sends `tensor` to the other shard."""
    def edit(ckpt: Path) -> None:
        def swap(index):
            m = index["weight_map"]
            m[tensor] = next(f for f in set(m.values()) if f != m[tensor])
        _edit_json(ckpt / index_name(kind), swap)
    return edit


def _name_missing_shard(ckpt: Path) -> None:
    _edit_json(ckpt / index_name("model"), lambda i: i["weight_map"].update({"embed.weight": shard_name("model", 2, 3)}))


def _truncate(name: str, keep: int):
    return lambda ckpt: (ckpt / name).write_bytes((ckpt / name).read_bytes()[:keep])


def _meta(edit):
    return lambda ckpt: _edit_json(ckpt / "meta.json", edit)


DAMAGE = {  # name -> edit of the final checkpoint; the manifest is sealed over it afterwards
    "model-index-wrong-mapping": _remap("model", "embed.weight"),
    "optimizer-index-wrong-mapping": _remap("optimizer", "exp_avg.embed.weight"),
    "index-names-missing-shard": _name_missing_shard,
    "model-index-truncated": _truncate(index_name("model"), 40),
    "optimizer-index-truncated": _truncate(index_name("optimizer"), 40),
    "shard-header-truncated": _truncate(shard_name("model", 1, 2), 20),
    "meta-wrong-step": _meta(lambda m: m.update(step=31)),
    "meta-missing-key": _meta(lambda m: m.pop("spec")),
    "meta-ledger-garbled": _meta(lambda m: m.update(ledger={"s1": "spent"})),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_cache) -> Path:
    """Stage s1 run to its end (made once); its final checkpoint sharded and indexed."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_forked(run_dir, data_cache, extra=ONE_STAGE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = run_dir / "checkpoints" / "0-s1" / FINAL
    _shard(final)
    assert latest_checkpoint(run_dir) == final  # the sharded form is a good checkpoint
    return run_dir


def _damaged_copy(finished: Path, run_dir: Path, damage) -> Path:
    shutil.copytree(finished, run_dir)
    final = run_dir / "checkpoints" / "0-s1" / FINAL
    damage(final)
    write_manifest(final)  # the checksums agree with the damage
    return final


def _final_weights(run_dir: Path) -> dict:
    weights = {}
    for f in sorted((run_dir / "checkpoints" / "0-s1" / FINAL).glob("model*.safetensors")):
        weights.update(load_file(f))
    return weights


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_checkpoint_that_does_not_load_falls_back_to_the_previous_one(kind, tmp_path, data_cache, finished):
    run_dir = tmp_path / "run"
    _damaged_copy(finished, run_dir, DAMAGE[kind])
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
    final = _damaged_copy(finished, run_dir, DAMAGE["model-index-wrong-mapping"])
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
