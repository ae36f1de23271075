"""The measured growth curve (bench/growth_curve.py's JSON) read at a plan's tokens per
parameter: interpolation in log(tokens per parameter), no figure outside the measured range
or beside a point where growth never reached scratch's loss, and `grow plan` printing it."""
from __future__ import annotations

import json
import math

import pytest

from orchestrator.budget import growth_curve as gc
from orchestrator.budget.planner import make_plan
from orchestrator.commands.plan import compose_config

from ..conftest import grow_in_process


def point(tpp, frac, std=0.02, op="msg", split="0.34,0.33,0.33"):
    return {"tokens_per_param": tpp, "best": {"operator": op, "split": split,
                                              "flops_frac": {"mean": frac, "std": std}}}


CURVE = {"params": 126384, "points": [point(8.0, 0.8, 0.04), point(0.5, 0.6), point(2.0, 0.7, 0.03, "zero")]}


def test_interpolates_linearly_in_log_tokens_per_param_between_the_points_around():
    mid = gc.measured_saving(1.0, CURVE, "growth_curve.json")  # halfway from 0.5 to 2 in log space
    assert mid.flops_frac == pytest.approx(0.65) and mid.std == pytest.approx(0.025)
    at = gc.measured_saving(4.0, CURVE, "growth_curve.json")
    assert at.flops_frac == pytest.approx(0.75)
    w = math.log(3.0 / 2.0) / math.log(4.0)
    assert gc.measured_saving(3.0, CURVE).flops_frac == pytest.approx(0.7 + w * 0.1)
    for tpp, frac in ((0.5, 0.6), (2.0, 0.7), (8.0, 0.8)):  # the points themselves, ends included
        assert gc.measured_saving(tpp, CURVE).flops_frac == pytest.approx(frac)
    assert (mid.lo, mid.hi, mid.params) == (0.5, 8.0, 126384)
    assert "0.65 +- 0.03 of its FLOPs (35% saved" in mid.note
    assert "msg at split 0.34,0.33,0.33 / zero at split 0.34,0.33,0.33" in mid.note
    assert "measured 0.5-8 tokens/param at a 126k-parameter final model" in mid.note


@pytest.mark.parametrize("tpp", [0.25, 8.5, 300.0])
def test_outside_the_measured_range_it_says_so_instead_of_guessing(tpp):
    s = gc.measured_saving(tpp, CURVE)
    assert s.flops_frac is None and s.std is None
    assert f"none at {tpp:.3g} tokens/param, outside the measured range" in s.note
    assert "measured 0.5-8 tokens/param" in s.note and "not extrapolated" in s.note


def test_beside_a_point_where_growth_never_reached_scratch_there_is_no_figure():
    curve = {"params": 1000, "points": [point(1.0, 0.6), point(10.0, None, None)]}
    s = gc.measured_saving(5.0, curve)
    assert s.flops_frac is None and "growth did not reach scratch's loss in every seed at 10 tokens/param" in s.note
    assert gc.measured_saving(1.0, curve).flops_frac == pytest.approx(0.6)


def test_no_curve_no_figure(tmp_path):
    assert gc.read_curve(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert gc.read_curve(tmp_path / "bad.json") is None
    assert gc.measured_saving(1.0, None) is None and gc.measured_saving(1.0, {"points": []}) is None


def test_the_shipped_curve_is_found_and_read_like_any_other():
    curve = gc.read_curve()
    assert curve is not None, "bench/results/growth_curve.json ships with the package: grow plan reads it"
    lo = min(p["tokens_per_param"] for p in curve["points"])
    s = gc.measured_saving(lo, curve)
    assert s.tokens_per_param == lo and s.source.endswith("growth_curve.json")


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A curve in place of the shipped one, as `grow plan` reads it."""
    def put(curve):
        path = tmp_path / "growth_curve.json"
        path.write_text(json.dumps(curve))
        monkeypatch.setattr(gc, "GROWTH_CURVE", path)
    return put


FLM = ["schedule=flm101b", "cluster=a800_192"]  # 311.5B tokens for a 101.7B final model: ~3.06 per parameter


def test_the_plan_carries_the_measured_saving_at_its_tokens_per_parameter(shipped):
    shipped(CURVE)
    plan = make_plan(compose_config(FLM))
    tpp = plan.totals["tokens"] / plan.scratch["params"]
    assert 3.0 < tpp < 3.1
    assert plan.measured["tokens_per_param"] == pytest.approx(tpp)
    assert plan.measured["flops_frac"] == pytest.approx(gc.measured_saving(tpp, CURVE).flops_frac)


def test_grow_plan_prints_the_measured_saving_beside_the_computed_one(shipped, tmp_path, capsys):
    shipped(CURVE)
    assert grow_in_process("plan", *FLM, f"hydra.run.dir={tmp_path / 'p'}") == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "of the FLOPs)" in out and "measured saving at 3.06 tokens/param: growth reached scratch's loss" in out
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["measured"]["lo"] == 0.5


def test_grow_plan_says_when_its_tokens_per_parameter_lie_outside_the_curve(shipped, tmp_path, capsys):
    shipped({"params": 126384, "points": [point(0.5, 0.6), point(2.0, 0.7)]})
    assert grow_in_process("plan", *FLM, f"hydra.run.dir={tmp_path / 'p'}") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "measured saving: none at 3.06 tokens/param, outside the measured range (measured 0.5-2" in out
    assert "not extrapolated" in out
