"""A growth transition reports where its time goes: per phase in the growth record
(summary.json, the grown stage's checkpoints) and as `transition/<phase>_s` at the grown
stage's first point of metrics.jsonl and MLflow; and it evaluates the old model once, at
the end of its stage."""
from __future__ import annotations

import json

import pytest

from ..conftest import read_summary

pytestmark = pytest.mark.slow

PHASES = {"plan", "old_check", "build", "grow_write", "load", "new_check", "seal"}
WRITER = {"writer_read", "writer_grow", "writer_write", "writer_hash", "writer_sync"}


def test_phases_of_each_growth_are_reported(tiny_run):
    _, run_dir, _ = tiny_run
    stages = read_summary(run_dir)["stages"]
    points = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for st in stages[1:]:
        phases = st["growth"]["phases"]
        assert set(phases) == PHASES | WRITER, phases
        assert all(v >= 0 for v in phases.values())
        # the writer's own split happens inside grow_write, and the whole record within the growth's time
        assert sum(phases[k] for k in WRITER) <= phases["grow_write"] + 0.01
        assert sum(phases[k] for k in PHASES - {"seal"}) <= st["growth"]["seconds"] + 0.01
        first = [p for p in points if p["stage"] == st["name"] and "growth/val_loss_before" in p]
        assert len(first) == 1
        assert {k[len("transition/"):-len("_s")]: v for k, v in first[0].items() if k.startswith("transition/")} \
            == phases


def test_phases_reach_mlflow(tiny_run):
    from mlflow.tracking import MlflowClient
    _, run_dir, _ = tiny_run
    s = read_summary(run_dir)
    client = MlflowClient(s["mlflow"]["tracking_uri"])
    s2 = client.get_run(s["stages"][1]["mlflow_run_id"])
    assert s2.data.metrics["transition/grow_write_s"] == pytest.approx(s["stages"][1]["growth"]["phases"]["grow_write"])


def test_the_old_models_check_loss_is_taken_once_at_its_stages_end(tiny_run):
    """The final checkpoint of a stage that a growth follows holds the old model's loss on the
    check's batches (`next_check`); the growth uses it (the 'before' of its record) instead of
    evaluating the old model again, in this job or a resumed one."""
    from orchestrator.checkpoint.canonical import read_meta
    _, run_dir, _ = tiny_run
    stages = read_summary(run_dir)["stages"]
    for before, after in zip(stages, stages[1:]):
        known = read_meta(before["checkpoint"])["next_check"]
        assert known["stage"] == after["name"] and known["check_dtype"] == "fp32"
        assert after["growth"]["val_loss_before"] == known["val_loss"]
    assert "next_check" not in read_meta(stages[-1]["checkpoint"])  # nothing follows the last stage


def test_a_recorded_loss_is_used_only_for_the_very_batches_it_was_taken_on():
    import dataclasses

    import torch

    from orchestrator.run.transition import StageSource, batches_digest, known_before

    batches = [torch.arange(12).reshape(2, 6)]
    stage = type("Stage", (), {"name": "s2"})()
    known = {"stage": "s2", "val_loss": 4.5, "check_dtype": "fp32", "batches": batches_digest(batches)}
    source = StageSource(weights={}, moments=None, spec=None, optimizer_step=0, name="s1", known_check=known)
    assert known_before(source, stage, batches) == 4.5
    other = [torch.arange(12).reshape(2, 6).flip(1)]
    for changed in ({"batches": batches_digest(other)}, {"stage": "s3"}, {"check_dtype": "bf16"},
                    {"val_loss": None}):
        assert known_before(dataclasses.replace(source, known_check={**known, **changed}), stage, batches) is None
    assert known_before(dataclasses.replace(source, known_check=None), stage, batches) is None
