"""`grow run -m` on this machine (Hydra's basic launcher): one MLflow parent run per member
with the swept values as params, and a sweep summary of final losses and costs. (`grow` runs
in a child forked from a process that has imported torch: tests/forked_grow.py.)"""
from __future__ import annotations

import json
import os

import pytest

from ..forked_grow import run_grow_forked

pytestmark = pytest.mark.slow


def test_local_multirun_two_members(tmp_path, data_cache):
    sweep_dir, db = tmp_path / "sweep", tmp_path / "m.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = run_grow_forked(["run", "-m", "schedule=tiny", "schedule.stages.0.lr.peak=3e-3,1e-3",
                            f"data.cache_dir={data_cache}", "engine.threads=1",
                            f"tracking.uri=sqlite:///{db}", f"hydra.sweep.dir={sweep_dir}"],
                           tmp_path, env, tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [m["swept"] for m in report["members"]] == [{"schedule.stages.0.lr.peak": "0.003"},
                                                       {"schedule.stages.0.lr.peak": "0.001"}]
    for m in report["members"]:
        assert m["status"] == "complete" and m["stages"] == ["s1", "s2", "s3"]
        assert m["final_val_loss"] > 0 and m["tokens"] == 3 * 16384 and m["cost_usd"] > 0
    assert "final val loss" in proc.stdout and "sweep_summary.json" in proc.stdout
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("growth")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len(runs) == 2 * 4
    assert sorted(r.data.params["sweep/schedule.stages.0.lr.peak"] for r in parents) == ["0.001", "0.003"]
    assert all("sweep/seed" not in r.data.params for r in parents)  # only the swept keys
