"""Proxy search (`grow search`) and loss prediction (`grow predict`, plan.loss_fit): the search's
choice from a real sweep, a real grid of proxies fitted (the law itself: tests/budget/
test_loss_law.py), a fit that is not a law refused (exit 5, one line) unless kept, the fit
carried into a finished `grow run`, and bad inputs refused with one line and exit 2."""
from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.commands.compose import CommandLine, compose
from orchestrator.budget.law_fit import fit_report
from orchestrator.budget.loss_law import law_of
from orchestrator.proxy.search import apply_to, choose

from ..budget.test_loss_law import TRUTH, grid as synthetic_grid
from ..conftest import grow_in_process

# A proxy of a few steps: members differ, each takes seconds.
PROXY = ["schedule=proxy", "schedule.stages.0.tokens=2048", "schedule.stages.0.shape.hidden=32",
         "schedule.stages.0.shape.ffn=128", "schedule.stages.0.shape.heads=2", "engine.threads=1",
         "schedule.stages.0.lr.min=1e-5", "schedule.stages.0.lr.warmup_steps=1", "train.eval_every_steps=4"]


def proxy_args(tmp_path, data_cache, *more: str) -> list[str]:
    return [*PROXY, f"data.cache_dir={data_cache}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", *more]


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
    (["predict.widths=32,64"], "grow: predict: predict.widths: 2 width(s) given; a fit of "
                               "L(N, D) = E + A/N^alpha + B/D^beta needs at least 3"),
    (["predict.widths=32,64,64"], "grow: predict: predict.widths: 2 width(s) given"),
    (["predict.widths=32,40,64"], "grow: predict: predict.widths: 40 is not a multiple"),
    (["predict.widths=32,48,64", "predict.tokens=4096,0"], "grow: predict: predict.tokens: 0 is not allowed"),
    (["predict.widths=32,48,64", "predict.seeds=0,x"], "grow: predict: predict.seeds: '0,x' is not a comma"),
    (["predict.widths=32,48,64", "predict.keep_unlawful=maybe"], "grow: predict: keep_unlawful: 'maybe' is not a "
                                                                 "boolean"),
    (["predict.widths=32,48,64", "predict.max_interval=-1"], "grow: predict: max_interval: -1 is not allowed"),
    (["predict.widths=32,48,64", "predict.bootstrap=5"], "grow: predict: bootstrap: 5 is not allowed"),
    (["predict.widths=32,48,64", "predict.form=power"], "grow: predict: predict.form: 'power' is not allowed"),
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


GRID = ["predict.widths=16,32,48", "predict.tokens=2048,3072,4096", "predict.seeds=0,1", "predict.bootstrap=40"]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, data_cache):
    """One real `grow predict` over 3 widths x 3 token counts x 2 seeds (18 proxies of a few
    steps), its fit kept whatever the verdict; (sweep directory, tmp dir)."""
    tmp = tmp_path_factory.mktemp("grid")
    sweep = tmp / "predict"
    code = grow_in_process("predict", *GRID, "predict.target=tiny", "predict.keep_unlawful=true",
                           *proxy_args(tmp, data_cache, "schedule.stages.0.lr.peak=1e-2"), f"hydra.sweep.dir={sweep}")
    assert code == 0
    return sweep, tmp


@pytest.mark.slow
def test_predict_fits_a_grid_of_widths_tokens_and_seeds(grid_sweep):
    sweep, _ = grid_sweep
    fit = json.loads((sweep / "loss_fit.json").read_text())
    assert fit["law"].startswith("L(N, D)") and fit["n"] == "non-embedding parameters"
    assert [(p["width"], p["tokens"], len(p["seed_losses"])) for p in fit["points"]] == [
        (w, d, 2) for w in (16, 32, 48) for d in (2048, 3072, 4096)]
    assert fit["finished"] == 18 and not fit["partial"] and (sweep / "loss_fit.png").stat().st_size > 0
    for p in fit["points"]:  # the measured losses; N of 2 llama blocks (attention 4h^2, SwiGLU 3 x 4h^2, 2 norms)
        losses = [json.loads((sweep / str(m) / "summary.json").read_text())["stages"][-1]["val_loss"]
                  for m in p["members"]]  # and the final norm
        assert p["seed_losses"] == losses and p["loss"] == pytest.approx(sum(losses) / 2)
        h = p["width"]
        assert p["n"] == 2 * (16 * h * h + 2 * h) + h
    seeds = {json.loads((sweep / str(m) / "config.json").read_text())["seed"] for m in fit["points"][0]["members"]}
    assert seeds == {0, 1}
    assert set(fit["parameters"]) == {"E", "a", "alpha", "b", "beta"}
    assert all(p["lo"] <= p["hi"] for p in fit["parameters"].values())
    assert len(fit["bootstrap"]["laws"]) + fit["bootstrap"]["failed"] == 40
    assert fit["kept_unlawful"] == (not fit["lawful"])
    stages = fit["predictions"]["stages"]
    assert [s["name"] for s in stages] == ["s1", "s2", "s3"] and all(s["lo"] <= s["hi"] for s in stages)


@pytest.mark.slow
def test_a_fit_that_is_not_a_law_exits_5_in_one_line_unless_kept(grid_sweep, data_cache, capsys):
    sweep, tmp = grid_sweep
    args = [*GRID, *proxy_args(tmp, data_cache, "schedule.stages.0.lr.peak=1e-2"), f"hydra.sweep.dir={sweep}"]
    capsys.readouterr()
    code = grow_in_process("predict", *args, "predict.max_interval=1e-6")  # the members are reused
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 5 and len(err) == 1, err
    assert err[0].startswith("grow: predict: not a law: ") and "limit 1e-06" in err[0]
    assert err[0].endswith("keep it with predict.keep_unlawful=true)")
    fit = json.loads((sweep / "loss_fit.json").read_text())
    assert not fit["lawful"] and not fit["kept_unlawful"]
    assert grow_in_process("predict", *args, "predict.max_interval=1e-6", "predict.keep_unlawful=true") == 0
    assert json.loads((sweep / "loss_fit.json").read_text())["kept_unlawful"]


@pytest.mark.slow
def test_a_finished_run_records_predicted_vs_actual(tmp_path, data_cache, capsys):
    """A lawful fit (synthetic points around the proxy's losses) into `grow run`: summary.json
    and MLflow get the predicted loss, its interval and the measured one."""
    fit = fit_report(synthetic_grid(TRUTH, noise=0.002), samples=50)
    assert fit["lawful"], fit["verdict"]
    path = tmp_path / "law.json"
    path.write_text(json.dumps(fit))
    run_dir = tmp_path / "run"
    assert grow_in_process("run", *proxy_args(tmp_path, data_cache), f"plan.loss_fit={path}",
                           f"hydra.run.dir={run_dir}") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    pred = summary["loss_prediction"]
    assert pred["actual_final_val_loss"] == summary["stages"][-1]["val_loss"]
    n = 2 * (16 * 32 * 32 + 2 * 32) + 32  # the proxy at width 32, 2048 tokens
    assert (pred["n"], pred["tokens"]) == (n, 2048)
    assert pred["predicted_final_val_loss"] == pytest.approx(law_of(fit)(n, 2048))
    assert pred["predicted_lo"] < pred["predicted_final_val_loss"] < pred["predicted_hi"]
    assert pred["within_interval"] == (pred["predicted_lo"] <= pred["actual_final_val_loss"] <= pred["predicted_hi"])
    assert math.isclose(pred["rel_error"], abs(pred["predicted_final_val_loss"] - pred["actual_final_val_loss"])
                        / pred["actual_final_val_loss"])
    parent = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(summary["mlflow"]["parent_run_id"])
    for key in ("predicted_final_val_loss", "predicted_lo", "predicted_hi", "actual_final_val_loss"):
        assert parent.data.metrics[f"predict/{key}"] == pytest.approx(pred[key])
