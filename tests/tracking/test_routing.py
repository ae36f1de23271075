"""A mixture of experts' router load balance is tracked per stage: every training step's
routing in metrics.jsonl and in the stage's MLflow run, each stage's sum in summary.json,
and a panel under the loss curve (tests/configs/schedule/moe_tiny.yaml: a dense stage, then
upcycled to 4 experts top-2, then the same mixture with another aux_loss_coef)."""
from __future__ import annotations

import json
import struct

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking.report import MetricsLog
from orchestrator.tracking.routing import stage_routing

from ..conftest import REPO, fork_grow, read_summary

CONFIGS = REPO / "tests" / "configs"
MOE_STAGES = ("moe", "moe_more_aux")
EXPERTS, TOP_K, LAYERS, TOKENS_PER_STEP = 4, 2, 2, 4 * 64  # moe_tiny's mixture: batch 4 x seq 64


@pytest.fixture(scope="module")
def moe_tracked(tmp_path_factory, data_cache):
    """moe_tiny on the local engine with MLflow on (cwd/mlflow.db): its run dir."""
    cwd = tmp_path_factory.mktemp("moe-tracked")
    fork_grow(cwd, "hydra.run.dir=run", "--config-dir", str(CONFIGS), cache=data_cache, schedule="moe_tiny")
    return cwd / "run"


def test_every_mixture_step_logs_its_routing_and_dense_steps_none(moe_tracked):
    points = [p for p in MetricsLog.read(moe_tracked / "metrics.jsonl") if "train/loss" in p]
    for p in points:
        routed = {k for k in p if k.startswith("moe/")}
        if p["stage"] == "dense":
            assert not routed
        else:
            assert routed == {"moe/aux_loss", "moe/max_load", "moe/dropped_tokens",
                              *(f"moe/tokens/expert_{e}" for e in range(EXPERTS))}
            # every token goes to top_k experts in every layer (dropless: none dropped)
            assert sum(p[f"moe/tokens/expert_{e}"] for e in range(EXPERTS)) == TOKENS_PER_STEP * TOP_K * LAYERS
            assert p["moe/dropped_tokens"] == 0
            assert 1.0 <= p["moe/max_load"] <= EXPERTS
            assert p["moe/aux_loss"] >= 1.0  # E x sum f_e P_e; top_k = 2 at perfect balance


def test_summary_sums_each_stage_and_mlflow_has_the_steps(moe_tracked):
    summary = read_summary(moe_tracked)
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["dense"]["routing"] is None
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    for name in MOE_STAGES:
        r, steps = stages[name]["routing"], stages[name]["steps"]
        assert r["steps"] == steps
        assert sum(r["tokens_per_expert"]) == steps * TOKENS_PER_STEP * TOP_K * LAYERS
        assert sum(r["expert_share"]) == pytest.approx(1.0)
        assert r["max_load"] == pytest.approx(max(r["expert_share"]) * EXPERTS)
        assert (r["dropped_tokens"], r["dropped_share"]) == (0.0, 0.0)
        run_id = stages[name]["mlflow_run_id"]
        history = client.get_metric_history(run_id, "moe/max_load")
        assert len(history) == steps
        for key in ("moe/aux_loss", "moe/dropped_tokens", *(f"moe/tokens/expert_{e}" for e in range(EXPERTS))):
            assert len(client.get_metric_history(run_id, key)) == steps, key
    assert "moe/max_load" not in client.get_run(stages["dense"]["mlflow_run_id"]).data.metrics


def test_the_loss_plot_has_a_routing_panel(moe_tracked):
    with open(moe_tracked / "loss.png", "rb") as f:
        width, height = struct.unpack(">II", f.read(24)[16:24])
    assert (width, height) == (960, 780)  # 8 x 6.5 in at 120 dpi (a dense run's plot: 8 x 4.5)


def test_stage_routing_sums_steps_and_counts_dropped_assignments():
    def point(stage, step, tokens, dropped=0.0, aux=2.5):
        return {"stage": stage, "step": step, "moe/aux_loss": aux, "moe/max_load": 1.0, "moe/dropped_tokens": dropped,
                **{f"moe/tokens/expert_{e}": t for e, t in enumerate(tokens)}}
    r = stage_routing([point("a", 1, [6, 2]), point("a", 2, [5, 3], dropped=1, aux=2.0),
                       {"stage": "d", "step": 3, "train/loss": 3.0}])
    assert set(r) == {"a"}
    a = r["a"]
    assert a["steps"] == 2 and a["tokens_per_expert"] == [11, 5]
    assert a["expert_share"] == [11 / 16, 5 / 16] and a["max_load"] == pytest.approx(2 * 11 / 16)
    assert a["dropped_tokens"] == 1 and a["dropped_share"] == 1 / 16
    assert a["aux_loss_mean"] == pytest.approx(2.25) and a["aux_loss_last_step"] == 2.0


def test_a_step_redone_after_a_resume_counts_once(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write("a", 1, {"moe/max_load": 1.5, "moe/aux_loss": 2.0, "moe/tokens/expert_0": 3.0,
                       "moe/tokens/expert_1": 1.0})
    log.write("a", 1, {"moe/max_load": 1.0, "moe/aux_loss": 2.0, "moe/tokens/expert_0": 2.0,
                       "moe/tokens/expert_1": 2.0})  # redone after a resume
    log.close()
    r = stage_routing(MetricsLog.read(tmp_path / "metrics.jsonl"))["a"]
    assert r["tokens_per_expert"] == [2.0, 2.0] and r["max_load"] == 1.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["stage"] == "a"
