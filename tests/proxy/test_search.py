"""Proxy search (`grow search`) and loss prediction (`grow predict`, plan.loss_fit): the fit
of L(N) = a*N^b + c, the search's choice from a real sweep, the fit carried into
`grow plan` and a finished `grow run`, and bad inputs refused with one line and exit 2."""
from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.commands.compose import CommandLine, compose
from orchestrator.budget.loss_law import FitError, PowerLaw, fit_power_law, fit_with_held_out, read_fit
from orchestrator.proxy.search import apply_to, choose

from ..conftest import grow_in_process

# A proxy of a few steps: members differ, each takes seconds.
PROXY = ["schedule=proxy", "schedule.stages.0.tokens=2048", "schedule.stages.0.shape.hidden=32",
         "schedule.stages.0.shape.ffn=128", "schedule.stages.0.shape.heads=2", "engine.threads=1",
         "schedule.stages.0.lr.min=1e-5", "schedule.stages.0.lr.warmup_steps=1", "train.eval_every_steps=4"]


def proxy_args(tmp_path, data_cache, *more: str) -> list[str]:
    return [*PROXY, f"data.cache_dir={data_cache}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", *more]


# -- the fit -------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,c", [(300.0, -0.4, 1.7), (12.0, -0.15, 0.9), (5e3, -0.7, 3.2)])
def test_fit_recovers_known_coefficients(a, b, c):
    ns = [2e4, 5e4, 1.3e5, 4e5, 1e6, 3e6]
    law = fit_power_law(ns, [a * n ** b + c for n in ns])
    assert law.a == pytest.approx(a, rel=1e-4) and law.b == pytest.approx(b, rel=1e-5)
    assert law.c == pytest.approx(c, rel=1e-5)


def test_held_out_largest_is_predicted_by_a_fit_without_it():
    truth = PowerLaw(80.0, -0.3, 2.0)
    # the largest point is 1% off the law: the fit without it predicts the law, so the error is 1%
    points = [{"n": n, "loss": truth(n)} for n in (1e4, 3e4, 1e5)] + [{"n": 1e6, "loss": truth(1e6) * 1.01}]
    fit = fit_with_held_out(points)
    held = fit["held_out"]
    assert held["n"] == 1e6 and held["predicted"] == pytest.approx(truth(1e6), rel=1e-6)
    assert held["rel_error"] == pytest.approx(1 / 101, rel=1e-4)
    assert fit_with_held_out(points[:3])["held_out"] is None  # 3 points: all needed for the fit


def test_fewer_than_three_sizes_cannot_be_fitted():
    with pytest.raises(FitError, match="2 model sizes given"):
        fit_power_law([1e4, 1e5, 1e5], [3.0, 2.5, 2.5])


# -- the search: choice and how its values reach a target ------------------------------

def test_choose_lowest_loss_earlier_member_on_a_tie():
    members = [{"member": 0, "final_val_loss": 3.0}, {"member": 1, "final_val_loss": 2.5},
               {"member": 2, "final_val_loss": 2.5}]
    assert choose(members)["member"] == 1


def test_apply_to_target_sets_every_stage_that_sets_the_key():
    flm = compose(CommandLine(["schedule=flm101b"]))  # every stage sets its own peak
    tiny = compose(CommandLine(["schedule=tiny"]))  # later stages inherit (peak: null)
    values = {"schedule.stages.0.lr.peak": "0.002", "model.init_std": "0.01"}
    assert apply_to(values, flm) == ["schedule.stages.0.lr.peak=0.002", "schedule.stages.1.lr.peak=0.002",
                                     "schedule.stages.2.lr.peak=0.002", "model.init_std=0.01"]
    assert apply_to(values, tiny) == ["schedule.stages.0.lr.peak=0.002", "model.init_std=0.01"]
    assert apply_to(values, None) == ["schedule.stages.0.lr.peak=0.002", "model.init_std=0.01"]


@pytest.mark.slow
def test_search_chooses_the_lowest_final_val_loss_and_nests_members_in_mlflow(tmp_path, data_cache, capsys):
    sweep = tmp_path / "search"
    space = tmp_path / "space.yaml"
    space.write_text("schedule.stages.0.lr.peak: [1.0e-4, 1.0e-2]\n")
    code = grow_in_process("search", f"search.space={space}", "search.target=flm101b", "model.init_std=0.02,0.04",
                           *proxy_args(tmp_path, data_cache), f"hydra.sweep.dir={sweep}")
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((sweep / "search.json").read_text())
    members = report["members"]
    assert len(members) == 4 and report["finished"] == [0, 1, 2, 3]
    losses = {m["member"]: json.loads((sweep / str(m["member"]) / "summary.json").read_text())
              ["stages"][-1]["val_loss"] for m in members}
    assert len(set(losses.values())) == 4  # the values really changed the runs
    best = min(losses, key=losses.get)
    winner = report["winner"]
    assert winner["member"] == best and winner["final_val_loss"] == losses[best]
    assert winner["swept"]["schedule.stages.0.lr.peak"] == "0.01"  # 4 steps at 1e-4 barely move
    lr, std = winner["swept"]["schedule.stages.0.lr.peak"], winner["swept"]["model.init_std"]
    assert report["apply"] == [f"schedule.stages.{i}.lr.peak={lr}" for i in range(3)] + [f"model.init_std={std}"]
    assert "grow run schedule=flm101b " + " ".join(report["apply"]) in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    search_run = client.get_run(report["mlflow_run_id"])
    assert search_run.data.tags["grow.kind"] == "search"
    assert search_run.data.metrics["search/best_val_loss"] == pytest.approx(losses[best])
    assert search_run.data.params["winner/schedule.stages.0.lr.peak"] == lr
    for m in members:  # each member's run (parent of its stage runs) is a child of the search's
        assert client.get_run(m["mlflow_parent_run_id"]).data.tags["mlflow.parentRunId"] == search_run.info.run_id


@pytest.mark.slow
def test_search_with_no_finished_member_exits_2_in_one_line(tmp_path, data_cache, capsys):
    # a budget cap stops every member before its stage ends: none finishes, nothing is chosen
    sweep = tmp_path / "search"
    code = grow_in_process("search", "schedule.stages.0.lr.peak=1e-3,1e-2", "budget.max_tokens=1024",
                           *proxy_args(tmp_path, data_cache), f"hydra.sweep.dir={sweep}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("grow: search: no member finished in ") and "nothing chosen" in err[-1]
    assert (sweep / "0" / "summary.json").exists() and not (sweep / "search.json").exists()


@pytest.mark.parametrize("args,message", [
    (["search.space=nope"], "grow: search: search.space: 'nope' is neither a preset (flm, lr_init) nor a file"),
    ([], "grow: search: nothing to search"),
    (["model.no_such_key=1,2"], "grow: config error: model.no_such_key"),
    (["search.target=nope", "seed=0,1"], "grow: search: search.target: overrides: In 'config': Could not find "
                                         "'schedule/nope'"),
    (["seed=0,1", "model.init_std=[0.1"], "grow: config error: "),
])
def test_search_refuses_bad_input_before_any_member_runs(tmp_path, capsys, args, message):
    code = grow_in_process("search", "schedule=proxy", *args, f"hydra.sweep.dir={tmp_path / 's'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "s").exists()


# -- prediction ------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["predict.widths=32,64"], "grow: predict: predict.widths: 2 width(s) given; a fit of L(N) = a * N^b + c "
                               "needs at least 3"),
    (["predict.widths=32,64,64"], "grow: predict: predict.widths: 2 width(s) given"),
    (["predict.widths=32,40,64"], "grow: predict: predict.widths: 40 is not a multiple"),
    (["predict.widths=32,48,64", "schedule=tiny"], "grow: predict: the proxy schedule 'tiny' has 3 stages"),
    (["predict.widths=32,48,64", "schedule.stages.0.lr.peak=1e-3,1e-2"], "grow: predict: swept overrides"),
    (["predict.widths=32,48,64", "predict.target=nope"], "grow: predict: predict.target: overrides: In 'config': "
                                                         "Could not find 'schedule/nope'"),
])
def test_predict_refuses_bad_input_before_any_proxy_runs(tmp_path, capsys, args, message):
    code = grow_in_process("predict", "schedule=proxy", *args, f"hydra.sweep.dir={tmp_path / 'p'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "p").exists()


def test_plan_refuses_a_missing_or_foreign_loss_fit(tmp_path, capsys):
    (tmp_path / "other.json").write_text('{"a": 1}')
    for path, message in ((tmp_path / "none.json", "no such file"), (tmp_path / "other.json", "not a loss fit")):
        code = grow_in_process("plan", "schedule=tiny", f"plan.loss_fit={path}", f"hydra.run.dir={tmp_path / 'plan'}")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("grow: config error: plan.loss_fit: ")
        assert message in err[0]
    assert not (tmp_path / "plan").exists()


@pytest.mark.slow
def test_predict_fits_proxies_and_the_fit_reaches_plan_and_run(tmp_path, data_cache, capsys):
    sweep = tmp_path / "predict"
    code = grow_in_process("predict", "predict.widths=16,32,48,64", "predict.target=tiny",
                           *proxy_args(tmp_path, data_cache, "schedule.stages.0.lr.peak=1e-2"),
                           f"hydra.sweep.dir={sweep}")
    out = capsys.readouterr().out
    assert code == 0, out
    fit = json.loads((sweep / "loss_fit.json").read_text())
    assert [p["width"] for p in fit["points"]] == [16, 32, 48, 64] and fit["n"] == "non-embedding parameters"
    assert fit["tokens"] == 2048 and (sweep / "loss_fit.png").stat().st_size > 0
    for p in fit["points"]:  # the measured losses; N of 2 llama blocks (attention 4h^2, SwiGLU 3 x 4h^2, 2 norms)
        summary = json.loads((sweep / str(p["member"]) / "summary.json").read_text())  # and the final norm
        assert p["loss"] == summary["stages"][-1]["val_loss"]
        h = p["width"]
        assert p["n"] == 2 * (16 * h * h + 2 * h) + h
    held = fit["held_out"]
    assert held["width"] == 64
    assert held["rel_error"] == pytest.approx(abs(held["predicted"] - held["loss"]) / held["loss"])
    law = read_fit(sweep / "loss_fit.json")
    assert [s["name"] for s in fit["predictions"]["stages"]] == ["s1", "s2", "s3"]
    assert all(s["predicted_loss"] == pytest.approx(law(s["n"])) for s in fit["predictions"]["stages"])
    assert f"relative error {100 * held['rel_error']:.2f}%" in out

    plan_dir = tmp_path / "plan"
    assert grow_in_process("plan", "schedule=tiny", f"plan.loss_fit={sweep / 'loss_fit.json'}",
                           f"hydra.run.dir={plan_dir}") == 0
    assert "pred. loss" in capsys.readouterr().out
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert [s["predicted_loss"] for s in plan["stages"]] == pytest.approx(
        [s["predicted_loss"] for s in fit["predictions"]["stages"]])

    run_dir = tmp_path / "run"
    assert grow_in_process("run", *proxy_args(tmp_path, data_cache), f"plan.loss_fit={sweep / 'loss_fit.json'}",
                           f"hydra.run.dir={run_dir}") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    pred = summary["loss_prediction"]
    assert pred["actual_final_val_loss"] == summary["stages"][-1]["val_loss"]
    assert pred["predicted_final_val_loss"] == pytest.approx(law(fit["points"][1]["n"]))  # width 32 = the proxy's
    assert math.isclose(pred["rel_error"], abs(pred["predicted_final_val_loss"] - pred["actual_final_val_loss"])
                        / pred["actual_final_val_loss"])
    parent = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.metrics["predict/predicted_final_val_loss"] == pytest.approx(pred["predicted_final_val_loss"])
    assert parent.data.metrics["predict/actual_final_val_loss"] == pytest.approx(pred["actual_final_val_loss"])
