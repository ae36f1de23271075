"""A checkpoint is intact only if it also loads: its indexes agree with its shards' headers.
Damage the manifest agrees with (tests/checkpoint/damage.py) is named by file and reason,
`latest_checkpoint` passes over it to the previous checkpoint, and the offline tools that read
one checkpoint (`grow grow`, `grow export-hf`) stop with one line and write nothing."""
from __future__ import annotations

import logging

import pytest
import torch

from growth_ops import ModelSpec

from orchestrator.checkpoint.canonical import (CheckpointError, checkpoint_dir, latest_checkpoint, save_checkpoint,
                                               verify)
from orchestrator.model import build_model

from ..conftest import grow_in_process
from .damage import damage, shard

SPEC = ModelSpec(layers=1, hidden=16, ffn=32, heads=2, kv_heads=1, head_dim=8, vocab=32)

# damage kind -> what the error says (after the damaged file's path)
REASONS = {
    "model-index-wrong-mapping": "model.safetensors.index.json maps 'embed.weight' to "
                                 "model-00001-of-00002.safetensors, but it is in model-00000-of-00002.safetensors",
    "optimizer-index-wrong-mapping": "optimizer.safetensors.index.json maps 'exp_avg.embed.weight' to "
                                     "optimizer-00001-of-00002.safetensors, but it is in optimizer-00000-of-00002",
    "index-names-missing-shard": "model.safetensors.index.json maps 'embed.weight' to "
                                 "model-00002-of-00003.safetensors, which is not a tensor file of the checkpoint",
    "model-index-truncated": "model.safetensors.index.json is not a valid index (JSONDecodeError",
    "optimizer-index-truncated": "optimizer.safetensors.index.json is not a valid index (JSONDecodeError",
    "shard-header-truncated": "model-00001-of-00002.safetensors is not a readable safetensors file",
}


def _save(root, step: int, **meta):
    state = build_model(SPEC, seed=step).canonical_state()
    moments = {k: {n: torch.zeros_like(t) for n, t in state.items()} for k in ("exp_avg", "exp_avg_sq")}
    meta = {"step": step, "stage_index": 0, "stage_name": "s1", "spec": SPEC.to_dict(), "masks": None, **meta}
    return save_checkpoint(checkpoint_dir(root, 0, "s1", step), state, moments, meta)


@pytest.mark.parametrize("kind", list(REASONS))
def test_damage_the_manifest_agrees_with_is_named_and_passed_over(kind, tmp_path, caplog):
    previous, newest = _save(tmp_path, 3), _save(tmp_path, 6)
    shard(newest)
    verify(newest)  # sharded and indexed, it is a good checkpoint
    damage(newest, kind)
    with pytest.raises(CheckpointError) as e:
        verify(newest)
    assert f"{newest}/{REASONS[kind]}" in str(e.value)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == previous
    assert REASONS[kind] in caplog.text


def test_meta_that_disagrees_with_its_place_or_the_run_is_passed_over(tmp_path):
    previous, newest = _save(tmp_path, 3, ledger={}), _save(tmp_path, 6)  # the newest has no ledger
    damaged: list[str] = []
    assert latest_checkpoint(tmp_path, damaged, check_meta=lambda meta: meta["ledger"]) == previous
    assert damaged == [f"{newest / 'meta.json'} has no 'ledger'"]
    assert latest_checkpoint(tmp_path) == newest  # without the run's reading of it, it is whole
    shard(newest)
    damage(newest, "meta-wrong-step")
    damaged = []
    assert latest_checkpoint(tmp_path, damaged) == previous
    assert damaged == [f"{newest / 'meta.json'} says step 5, but the checkpoint is step 6"]


@pytest.mark.parametrize("command", ["grow", "export-hf"])
def test_offline_tools_stop_with_one_line_on_a_checkpoint_that_does_not_load(command, tmp_path, capsys):
    ckpt = _save(tmp_path / "run", 6)
    shard(ckpt)
    damage(ckpt, "model-index-wrong-mapping")
    out = tmp_path / "out"
    args = ["growth=clone", "hidden=32", "ffn=64"] if command == "grow" else []
    assert grow_in_process(command, f"ckpt={ckpt}", f"out={out}", *args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("grow: "), err
    assert f"{ckpt}/{REASONS['model-index-wrong-mapping']}" in err and "nothing was written" in err
    assert not out.exists()
