"""The whole product on the tiny schedule, through the real CLI: stages, MSG growth,
checkpoints, resume after SIGKILL, MLflow, ledger, budget caps, summary contract."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from orchestrator.checkpoint.canonical import latest_checkpoint, read_meta

from ..conftest import fork_grow, fork_grow_start, read_summary

pytestmark = pytest.mark.slow


@pytest.fixture
def full_run(tiny_run):
    """One uninterrupted run of the tiny schedule through the real `grow` script (conftest's
    `tiny_run`, shared by the tests that read it). The runs that follow it, restart it or
    compete with it are forked from a process that has imported torch already (conftest's
    fork_grow): what they test is what a run does, not how an interpreter starts."""
    return tiny_run


def test_summary_contract(full_run):
    _, run_dir, _ = full_run
    s = read_summary(run_dir)
    assert [st["name"] for st in s["stages"]] == ["s1", "s2", "s3"]
    for st in s["stages"]:
        assert set(st) >= {"name", "params", "tokens", "steps", "flops", "layout", "val_loss",
                           "growth", "checkpoint", "mlflow_run_id"}
        assert st["layout"] == {"tp": 1, "pp": 1, "dp": 1}
        assert Path(st["checkpoint"]).is_dir() and read_meta(st["checkpoint"])["stage_complete"]
        assert st["mlflow_run_id"]
    assert s["stages"][0]["growth"] is None
    assert s["stages"][0]["params"] < s["stages"][1]["params"] < s["stages"][2]["params"]
    # tiny: 32 steps of 8x64, 32 of 8x64, 16 of 8x128 (context doubled in s3)
    assert [st["steps"] for st in s["stages"]] == [32, 32, 16]
    assert [st["tokens"] for st in s["stages"]] == [16384, 16384, 16384]
    assert s["totals"]["tokens"] == 3 * 16384
    assert s["totals"]["flops"] == pytest.approx(sum(st["flops"] for st in s["stages"]))
    assert s["totals"]["cost_usd"] > 0 and s["totals"]["gpu_hours"] > 0
    assert set(s["mlflow"]) == {"tracking_uri", "experiment", "parent_run_id"}
    assert (run_dir / "loss.png").stat().st_size > 10_000


def test_growth_preserves_loss_and_loss_falls(full_run):
    _, run_dir, proc = full_run
    stages = read_summary(run_dir)["stages"]
    for st in stages[1:]:
        g = st["growth"]
        assert g["operator"] == "msg"
        assert abs(g["val_loss_after"] - g["val_loss_before"]) <= 1e-5
    assert stages[-1]["val_loss"] < stages[0]["val_loss"]
    assert "val loss" in proc.stdout and "total" in proc.stdout  # the table


def test_flops_follow_the_formula(full_run):
    from growth_ops.spec import ModelSpec
    from orchestrator.model import flops_per_token
    _, run_dir, _ = full_run
    s = read_summary(run_dir)
    meta = read_meta(s["stages"][2]["checkpoint"])
    spec = ModelSpec.from_dict(meta["spec"])
    assert s["stages"][2]["flops"] == pytest.approx(flops_per_token(spec, 128) * 16384)


def test_mlflow_parent_and_child_runs(full_run):
    from mlflow.tracking import MlflowClient
    cwd, run_dir, _ = full_run
    s = read_summary(run_dir)
    # the default store is MLflow's own: sqlite mlflow.db in the working directory
    assert s["mlflow"]["tracking_uri"] == f"sqlite:///{cwd / 'mlflow.db'}"
    client = MlflowClient(s["mlflow"]["tracking_uri"])
    parent = client.get_run(s["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert "summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.params["schedule.name"] == "tiny"
    for st in s["stages"]:
        child = client.get_run(st["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        losses = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(losses) == st["steps"]
        for key in ("val/loss", "train/lr", "perf/tokens_per_s", "progress/flops", "growth/mask",
                    "budget/spent_usd"):
            assert key in child.data.metrics, key
    s2 = client.get_run(s["stages"][1]["mlflow_run_id"])
    assert s2.data.metrics["growth/val_loss_before"] == pytest.approx(
        s["stages"][1]["growth"]["val_loss_before"])
    masks = [m.value for m in client.get_metric_history(s2.info.run_id, "growth/mask")]
    assert masks[0] == 0.0 and masks[-1] == 1.0 and sorted(masks) == masks  # the ramp


def test_rerun_of_finished_run_does_nothing(full_run, data_cache):
    cwd, run_dir, _ = full_run
    before = read_summary(run_dir)
    proc = fork_grow(cwd, f"hydra.run.dir={run_dir}", cache=data_cache)
    assert "already finished" in proc.stdout
    assert read_summary(run_dir)["totals"] == before["totals"]


def test_sigkill_mid_stage_resumes_to_the_same_result(full_run, tmp_path, data_cache):
    """Kill the run hard in the middle of stage 2, start it again: same final val loss,
    every token counted once, and the MLflow runs continue."""
    _, ref_dir, _ = full_run
    run_dir = tmp_path / "run"
    proc = fork_grow_start(tmp_path, f"hydra.run.dir={run_dir}", "checkpoint.every_steps=5", cache=data_cache)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a mid-stage checkpoint of stage 2
        ckpt = latest_checkpoint(run_dir) if (run_dir / "checkpoints" / "latest").exists() else None
        if ckpt and ckpt.parent.name == "1-s2" and 5 <= read_meta(ckpt)["step"] < 30:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no mid-stage checkpoint in stage 2 appeared")
    time.sleep(0.3)  # a little past the checkpoint: some work will be redone
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    killed_at = read_meta(latest_checkpoint(run_dir))
    assert killed_at["stage_name"] == "s2" and not killed_at["stage_complete"]

    again = fork_grow(tmp_path, f"hydra.run.dir={run_dir}", "checkpoint.every_steps=5", cache=data_cache)
    assert "resuming stage s2" in again.stdout
    ref, got = read_summary(ref_dir), read_summary(run_dir)
    assert abs(got["stages"][-1]["val_loss"] - ref["stages"][-1]["val_loss"]) <= 1e-6
    assert got["totals"]["tokens"] == ref["totals"]["tokens"]
    assert got["totals"]["flops"] == pytest.approx(ref["totals"]["flops"])
    assert got["mlflow"]["parent_run_id"] == json.loads((run_dir / "tracking.json").read_text())["parent_run_id"]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(got["mlflow"]["tracking_uri"])
    s2 = got["stages"][1]["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(s2, "train/loss")]
    assert sorted(steps) == sorted(set(steps)) and len(steps) == 32  # redone steps logged once
    assert len(client.search_runs([client.get_experiment_by_name("growth").experiment_id])) == 4


def test_budget_cap_stops_at_a_step_boundary_with_checkpoint(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cap = 16384 + 5 * 512 + 100  # stage 1, then 5 whole steps of stage 2 and a bit
    proc = fork_grow(tmp_path, f"hydra.run.dir={run_dir}", f"budget.max_tokens={cap}",
                     "tracking=off", cache=data_cache)
    assert "budget.max_tokens" in proc.stdout
    s = read_summary(run_dir)
    assert s["status"] == "stopped: budget.max_tokens=" + str(cap)
    assert s["totals"]["tokens"] == 16384 + 5 * 512 <= cap
    meta = read_meta(latest_checkpoint(run_dir))
    assert meta["stage_name"] == "s2" and meta["step"] == 5
    # raising the cap continues from there, to the end
    fork_grow(tmp_path, f"hydra.run.dir={run_dir}", "tracking=off", cache=data_cache)
    assert read_summary(run_dir)["totals"]["tokens"] == 3 * 16384


def test_second_run_on_same_dir_is_refused_while_first_runs(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    first = fork_grow_start(tmp_path, f"hydra.run.dir={run_dir}", "tracking=off", cache=data_cache)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = fork_grow(tmp_path, f"hydra.run.dir={run_dir}", "tracking=off", cache=data_cache,
                           check=False)
        assert second.returncode == 2
        assert "in use by another grow run" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_changed_schedule_on_resume_is_refused(full_run, data_cache):
    cwd, run_dir, _ = full_run
    proc = fork_grow(cwd, f"hydra.run.dir={run_dir}", "schedule.stages.0.tokens=32768",
                     cache=data_cache, check=False)
    assert proc.returncode == 2
    assert "schedule.stages.0.tokens" in proc.stderr and "differs" in proc.stderr


def test_grow_run_says_what_it_does_before_the_slow_parts(tmp_path, data_cache):
    """The first line comes before data preparation and model building (a long first step
    used to leave the terminal silent for minutes)."""
    proc = fork_grow(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", "tracking=off", "budget.max_tokens=512",
                     cache=data_cache)
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"grow run: {tmp_path / 'run'}: preparing data, then stage s1"), proc.stdout[:500]
