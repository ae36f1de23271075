"""Canonical checkpoints: round trip, checksums, atomic replace, `latest` fallback."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from orchestrator.checkpoint.canonical import (CheckpointError, all_checkpoints, checkpoint_dir, latest_checkpoint,
                                     load_checkpoint, prune, save_checkpoint)


def _state(seed: int):
    g = torch.Generator().manual_seed(seed)
    model = {"embed.weight": torch.randn(5, 4, generator=g), "final_norm.weight": torch.ones(4)}
    moments = {"exp_avg": {k: torch.randn_like(v) for k, v in model.items()},
               "exp_avg_sq": {k: torch.rand_like(v) for k, v in model.items()}}
    return model, moments


def test_round_trip_is_exact(tmp_path):
    model, moments = _state(0)
    path = save_checkpoint(checkpoint_dir(tmp_path, 0, "s1", 10), model, moments, {"step": 10})
    m2, mo2, meta = load_checkpoint(path)
    assert meta["step"] == 10 and meta["format"] == 1
    for k in model:
        assert torch.equal(m2[k], model[k])
        assert torch.equal(mo2["exp_avg"][k], moments["exp_avg"][k])
        assert torch.equal(mo2["exp_avg_sq"][k], moments["exp_avg_sq"][k])
    assert latest_checkpoint(tmp_path) == path
    assert json.loads((tmp_path / "checkpoints" / "latest").read_text())["path"] == "0-s1/step_00000010"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_file_is_detected_and_previous_used(tmp_path, damage, caplog):
    a = save_checkpoint(checkpoint_dir(tmp_path, 0, "s1", 1), *_state(1), {"step": 1})
    b = save_checkpoint(checkpoint_dir(tmp_path, 0, "s1", 2), *_state(2), {"step": 2})
    f = b / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(b)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == a
    assert "model.safetensors" in caplog.text


def test_partial_write_is_never_visible(tmp_path):
    """A temp directory left by a kill during a save is neither listed nor pointed at."""
    good = save_checkpoint(checkpoint_dir(tmp_path, 0, "s1", 1), *_state(1), {"step": 1})
    partial = good.parent / ".step_00000002.tmp-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert all_checkpoints(tmp_path) == [good]
    assert latest_checkpoint(tmp_path) == good


def test_saving_the_same_step_again_replaces_it(tmp_path):
    path = checkpoint_dir(tmp_path, 0, "s1", 3)
    save_checkpoint(path, *_state(1), {"step": 3, "v": 1})
    save_checkpoint(path, *_state(2), {"step": 3, "v": 2})
    assert load_checkpoint(path)[2]["v"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["step_00000003"]


def test_prune_keeps_newest_and_stage_final(tmp_path):
    for step in range(1, 6):
        save_checkpoint(checkpoint_dir(tmp_path, 0, "s1", step), *_state(step),
                        {"step": step, "stage_complete": step == 5})
    prune(tmp_path / "checkpoints" / "0-s1", keep=2)
    assert [p.name for p in all_checkpoints(tmp_path)] == ["step_00000003", "step_00000004", "step_00000005"]
