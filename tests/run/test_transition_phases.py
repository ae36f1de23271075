"""Where a growth transition's time goes is reported: per phase in the growth record
(summary.json, the grown stage's checkpoints) and as `transition/<phase>_s` at the grown
stage's first point of metrics.jsonl and MLflow."""
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
