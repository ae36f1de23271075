"""The Checkpointer: one object for a run directory's saves (one process or many writers),
the newest intact checkpoint, lazy opening, staging and retention."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import save_file

from orchestrator.checkpoint.checkpointer import Checkpointer


@dataclass(frozen=True)
class Role:  # what an engine's ShardRole offers a write
    index: int | None
    count: int
    leader: bool
    barrier: Callable[[], None] = lambda: None


def _state(seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = {"embed.weight": torch.randn(5, 4, generator=g), "final_norm.weight": torch.ones(4)}
    return weights, {"exp_avg": {k: torch.randn(v.shape, generator=g) for k, v in weights.items()},
                     "exp_avg_sq": {k: torch.rand(v.shape, generator=g) for k, v in weights.items()}}


def test_save_latest_open_and_retention(tmp_path):
    ckpts = Checkpointer(tmp_path, keep=1)
    for step in (1, 2, 3):
        assert ckpts.save(ckpts.path(0, "s1", step), *_state(step), {"step": step, "stage_complete": step == 3})
    assert [p.name for p in ckpts.all()] == ["step_00000002", "step_00000003"]  # 1 pruned, final kept
    latest = ckpts.latest()
    assert latest == ckpts.path(0, "s1", 3) and ckpts.read_meta(latest)["step"] == 3
    opened = ckpts.open(latest, check=True)
    weights, moments = _state(3)
    assert torch.equal(opened.weights["embed.weight"], weights["embed.weight"])
    assert torch.equal(opened.moments["exp_avg_sq"]["final_norm.weight"], moments["exp_avg_sq"]["final_norm.weight"])


def test_writers_save_shards_and_only_the_leader_publishes(tmp_path):
    ckpts = Checkpointer(tmp_path, keep=2)
    path = ckpts.path(1, "s2", 0)
    weights, moments = _state(0)
    assert ckpts.save(path, weights, moments, {"step": 0}, Role(0, 1, leader=True))
    assert (path / "model-00000-of-00001.safetensors").exists() and ckpts.latest() == path
    assert ckpts.open(path, check=True).weights.stored("embed.weight")[1] == (5, 4)
    # a rank that owns no file and does not lead writes nothing and publishes nothing
    assert not ckpts.save(ckpts.path(1, "s2", 4), {}, {}, {"step": 4}, Role(None, 1, leader=False))
    assert ckpts.latest() == path and ckpts.all() == [path]


def test_staged_files_are_invisible_until_published(tmp_path):
    ckpts = Checkpointer(tmp_path, keep=2)
    path = ckpts.path(1, "s2", 0)
    staged = path.with_name(f".{path.name}.tmp-grown")
    staged.mkdir(parents=True)
    weights, _ = _state(1)
    save_file(weights, staged / "model.safetensors")
    save_file({}, staged / "optimizer.safetensors")
    assert ckpts.all() == [] and ckpts.latest() is None
    assert torch.equal(ckpts.open_staged(staged).weights["embed.weight"], weights["embed.weight"])
    assert ckpts.publish(staged, path, {"step": 0}) == path
    assert ckpts.latest() == path and not staged.exists()
    ckpts.discard(path.with_name(".other.tmp-grown"))  # nothing there: no error
