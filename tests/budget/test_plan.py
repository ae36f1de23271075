"""`grow plan`: the FLM-101B plan, from-scratch comparison, budget checks and fitting,
impossible layouts; the plan's FLOPs are the ledger's."""
from __future__ import annotations

import json
import subprocess

import pytest

from orchestrator.commands.plan import compose_config
from orchestrator.budget.planner import make_plan
from orchestrator.schedule import resolve
from orchestrator.config.errors import ConfigError

from ..conftest import grow_cmd, grow_in_process

FLM = ["schedule=flm101b", "cluster=a800_192"]


def plan_of(*overrides: str):
    return make_plan(compose_config(list(overrides)))


def grow_plan(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(grow_cmd("plan", *args), cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def flm():
    return plan_of(*FLM)


def test_flm_shapes_match_the_published_sizes_and_tokens(flm):
    params = [s.params for s in flm.stages]
    for got, want in zip(params, (16e9, 51e9)):
        assert abs(got / want - 1) <= 0.02
    assert params[2] == pytest.approx(101.69e9, rel=1e-3)  # 80 x 10240, 80 heads, vocab 100,256
    assert {s.shape["hidden"] // s.shape["heads"] for s in flm.stages} == {128}
    assert [round(s.tokens / 1e9, 2) for s in flm.stages] == [245.37, 39.64, 26.54]
    assert [s.layout for s in flm.stages] == [{"tp": 2, "pp": 1, "dp": 96}, {"tp": 4, "pp": 2, "dp": 24},
                                             {"tp": 4, "pp": 4, "dp": 12}]
    assert [s.tflops_per_gpu for s in flm.stages] == [162, 160, 165]
    assert [s.throughput for s in flm.stages] == ["measured"] * 3
    assert [s.nodes for s in flm.stages] == [24, 24, 24] and flm.scratch["nodes"] == 24  # 8 GPUs a node, as FLM-101B


def test_flm_totals_and_the_from_scratch_comparison(flm):
    t, sc = flm.totals, flm.scratch
    assert t["flops"] == pytest.approx(sum(s.flops for s in flm.stages))
    assert t["tokens"] == sc["tokens"] == sum(s.tokens for s in flm.stages)
    # 6N + attention on 192 GPUs at the published TFLOP/s: ~20 days vs ~72 from scratch
    assert 18 < t["days"] < 23 and 65 < sc["days"] < 80
    assert t["gpu_hours"] == pytest.approx(t["days"] * 24 * 192, rel=1e-9)
    assert t["usd"] == pytest.approx(t["gpu_hours"] * 1.0)
    assert flm.saving_pct == pytest.approx(100 * (1 - t["usd"] / sc["usd"]))
    assert 65 < flm.saving_pct < 80
    assert flm.budget["fits"] and not flm.warnings


def test_grow_plan_cli_prints_the_table_and_writes_plan_json(tmp_path, capsys):
    code = grow_in_process("plan", *FLM, f"hydra.run.dir={tmp_path / 'p'}")
    out, err = capsys.readouterr()
    assert code == 0, err
    for word in ("s16b", "s51b", "s101b", "total", "from scratch", "GPU-hours", "days", "USD", "saves"):
        assert word in out
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert len(plan["stages"]) == 3
    for part in ("totals", "scratch"):
        assert set(plan[part]) >= {"flops", "gpu_hours", "days", "usd"}
    assert 65 < plan["saving_pct"] < 80
    assert {"params", "tokens", "flops", "gpu_hours", "days", "usd", "layout"} <= set(plan["stages"][0])


def test_recompute_costs_time_not_model_flops(flm):
    full = plan_of(*FLM, "plan.recompute=full")
    assert full.totals["flops"] == pytest.approx(flm.totals["flops"])
    assert full.totals["days"] == pytest.approx(flm.totals["days"] * 4 / 3)
    sel = plan_of(*FLM, "plan.recompute=selective")
    assert flm.totals["days"] < sel.totals["days"] < full.totals["days"]


def test_plan_flops_are_the_ledgers_formula_for_the_default_schedule():
    from growth_ops.spec import ModelSpec
    from orchestrator.model import flops_per_token
    cfg = compose_config([])
    plan = make_plan(cfg)
    assert resolve(cfg).vocab == 320  # 257 byte tokens padded to 64, as the run pads them
    for stage, sp in zip(cfg.schedule.stages, plan.stages):
        s = stage.shape
        spec = ModelSpec(layers=s.layers, hidden=s.hidden, ffn=s.ffn, heads=s.heads, kv_heads=s.heads,
                         head_dim=s.hidden // s.heads, vocab=320)
        steps = stage.tokens // (stage.batch_size * stage.seq_len)
        assert sp.flops == pytest.approx(flops_per_token(spec, stage.seq_len) * steps * stage.batch_size * stage.seq_len)


def test_over_budget_is_reported_with_where_the_run_stops(tmp_path, flm, capsys):
    cap = flm.totals["usd"] / 2
    code = grow_in_process("plan", *FLM, f"budget.max_usd={cap}", f"hydra.run.dir={tmp_path / 'p'}")
    out = capsys.readouterr().out
    assert code == 4
    assert "over budget" in out and "budget.max_usd" in out
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    v = plan["budget"]["violations"][0]
    assert not plan["budget"]["fits"] and v["key"] == "budget.max_usd"
    assert v["stop"]["stage"] == "s51b"  # s16b costs ~46% of the plan


def test_fit_keeps_proportions_and_spends_the_budget(flm):
    for cap in (50_000.0, 250_000.0):
        fitted = plan_of(*FLM, f"budget.max_usd={cap}", "plan.fit=true")
        assert cap * 0.999 <= fitted.totals["usd"] <= cap
        ratio = [f.steps / o.steps for f, o in zip(fitted.stages, flm.stages)]
        assert max(ratio) - min(ratio) < 1e-3
        assert fitted.fit["overrides"][0].startswith("schedule.stages.0.tokens=")
        assert fitted.budget["fits"]
    by_tokens = plan_of(*FLM, "budget.max_tokens=100000000000", "plan.fit=true")
    assert 99.9e9 < by_tokens.totals["tokens"] <= 100e9


def test_fit_refuses_a_budget_below_the_smallest_useful_schedule(tmp_path):
    with pytest.raises(ConfigError) as e:
        plan_of(*FLM, "budget.max_usd=100", "plan.fit=true")
    assert e.value.key == "budget.max_usd" and "allowed: >= $" in str(e.value)
    minimum = float(str(e.value).rsplit("$", 1)[1].replace(",", ""))
    plan = plan_of(*FLM, f"budget.max_usd={minimum * 1.01}", "plan.fit=true")  # the minimum is enough
    assert plan.totals["usd"] <= minimum * 1.01
    proc = grow_plan(tmp_path, *FLM, "budget.max_usd=100", "plan.fit=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2  # through the real `grow` script
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("grow: config error: budget.max_usd:")
    with pytest.raises(ConfigError, match="plan.fit"):
        plan_of(*FLM, "plan.fit=true")  # nothing to fit to


@pytest.mark.parametrize("overrides, key, words", [
    (["cluster=local_cpu"], "schedule.stages.0.layout", "cluster.gpus=1"),
    (["schedule.stages.0.layout.tp=3", "schedule.stages.0.layout.dp=32"], "schedule.stages.0.layout.tp",
     "heads=40"),
    (["schedule.stages.1.layout.pp=5", "schedule.stages.1.layout.dp=8"], "schedule.stages.1.layout.pp",
     "layers=72"),
    (["cluster.gpu_memory_gb=40"], "schedule.stages.0.layout", "GiB per GPU"),
    (["plan.recompute=partial"], "plan.recompute", "allowed: none, selective, full"),
    (["cluster.gpus=0"], "cluster.gpus", "> 0"),
    (["cluster.achieved_tflops_per_gpu.s16b=400"], "cluster.achieved_tflops_per_gpu.s16b", "peak"),
    (["budget.warn_at=[0.5,1.5]"], "budget.warn_at.1", "fraction"),
])
def test_impossible_layouts_and_bad_keys_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        plan_of(*FLM, *overrides)
    assert e.value.key == key and words in str(e.value)


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError) as e:
        compose_config([*FLM, "cluster.gpus_typo=3"])
    assert e.value.key == "cluster.gpus_typo" and "allowed:" in str(e.value)


def test_grow_run_still_refuses_parallel_layouts_on_the_local_engine():
    from orchestrator.commands.compose import CommandLine, load
    with pytest.raises(ConfigError) as e:
        load(CommandLine(list(FLM)))  # as `grow run` validates, not `grow plan`
    assert e.value.key == "schedule.stages.0.layout" and "engine.name=local" in str(e.value)
