"""The core's single sources of truth: the resolved schedule, the engine registry, the run
state's round trip and the one rule for what runs next (and the runs that rely on them)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from growth_ops import MaskState
from orchestrator.budget.ledger import Ledger
from orchestrator.commands.plan import compose_config
from orchestrator.config.errors import ConfigError
from orchestrator.engines.base import Engine
from orchestrator.engines.registry import ENGINES, engine_kind
from orchestrator.model import flops_per_token
from orchestrator.run.state import RunState, is_finished, next_stage
from orchestrator.schedule import resolve

from ..conftest import fork_grow, grow_cmd, read_summary


def test_resolved_schedule_carries_every_derived_value():
    cfg = compose_config(["schedule=tiny", "schedule.stages.1.layout.dp=2", "engine=deepspeed"])
    schedule = resolve(cfg)
    assert schedule.vocab == 320  # 257 byte tokens padded to model.vocab_multiple=64
    assert schedule.names == ["s1", "s2", "s3"]
    for st in schedule:
        c = st.config
        assert st.steps == c.tokens // (c.batch_size * c.seq_len) and st.tokens == st.steps * st.step_tokens
        assert st.flops_per_token == flops_per_token(st.spec, c.seq_len)
        assert st.step_flops == st.flops_per_token * c.batch_size * c.seq_len
        assert st.spec.vocab == 320 and st.spec.hidden == c.shape.hidden
    assert [st.world for st in schedule] == [1, 2, 1]
    assert schedule[0].growth is None  # nothing to grow from
    assert schedule[1].growth.operator == "msg" and schedule[1].growth.tolerance == cfg.growth.tolerance
    assert resolve(cfg, tokenizer_size=1000).vocab == 1024  # a trained tokenizer's real size


def test_engines_declare_what_they_can_do():
    assert set(ENGINES) == {"local", "deepspeed"}
    local, ds = engine_kind("local"), engine_kind("deepspeed")
    assert not local.multi_rank
    assert ds.multi_rank
    with pytest.raises(ConfigError, match="engine.name: 'jax' is not allowed; allowed: local, deepspeed"):
        engine_kind("jax")
    cfg = compose_config(["schedule=tiny"])
    engine = local.create(cfg, resolve(cfg)[0])
    assert isinstance(engine, Engine) and engine.shard_role() is None and engine.devices == 1
    cfg.schedule.stages[2].layout.tp = 2
    with pytest.raises(ConfigError, match=r"schedule.stages.2.layout: engine.name=local runs tp=pp=dp=1"):
        local.check_layouts(cfg)
    ds.check_layouts(cfg)  # tp=2 divides the heads, kv heads, FFN and vocabulary of s2 and s3
    cfg.schedule.stages[1].layout.tp = 2
    with pytest.raises(ConfigError, match=r"stages.1.layout.tp: 2 does not divide kv_heads=1 \(the previous"):
        ds.check_layouts(cfg)


def test_run_state_round_trips_through_meta():
    cfg = compose_config(["schedule=tiny"])
    stage = resolve(cfg)[1]
    ledger = Ledger()
    ledger.stage("s1").add(16384, 2e9, 3.0, 1, 2.0)
    ledger.add_lost("s1", 12.5)
    state = RunState(stage_index=1, stage_name="s2", steps_total=stage.steps, spec=stage.spec, lr_peak=1e-3,
                     data_cursor={"global": 1234, "sources": {"stdlib": 99}}, ledger=ledger, step=7,
                     global_step_start=32, lr=4e-4, val_loss=3.2, growth={"operator": "msg"},
                     completed_stages=[{"name": "s1"}], optimizer_step=39, rng={"torch": "AAAA"},
                     masks=MaskState(ramp_steps=8, steps_done=3, hidden_new=[64, 65], ffn_new=[], heads_new=[2],
                                     layers_new=[]), tracking={"parent_run_id": "x"}, saved_at=1.5)
    meta = json.loads(json.dumps(state.to_meta()))  # as meta.json holds it
    assert meta["global_step"] == 39 and meta["masks"]["steps_done"] == 3
    again = RunState.from_meta(meta)
    assert again.to_meta() == meta
    assert again.ledger.total.tokens == 16384 and again.ledger.lost["s1"]["restarts"] == 1
    state.masks.advance(5)  # a finished ramp is not carried on
    assert state.to_meta()["masks"] is None


def test_one_rule_for_what_runs_next():
    def meta(index: int, complete: bool) -> dict:
        return {"stage_index": index, "stage_complete": complete}

    assert next_stage(None, 3) == next_stage(None, 3) and next_stage(None, 3).action == "fresh"
    assert (next_stage(meta(1, False), 3).action, next_stage(meta(1, False), 3).index) == ("resume", 1)
    assert (next_stage(meta(1, True), 3).action, next_stage(meta(1, True), 3).index) == ("grow", 2)
    assert next_stage(meta(2, True), 3).done and next_stage(meta(2, True), 3).index is None
    assert not is_finished(None, 0)
    assert is_finished(meta(1, False), 0) and not is_finished(meta(1, False), 1)
    assert is_finished(meta(1, True), 1) and not is_finished(meta(1, True), 2)


@pytest.mark.slow
def test_a_diverging_loss_stops_without_saving_past_the_last_good_checkpoint(tmp_path, data_cache):
    """Adam moves every weight by ~lr per step: at lr 1e30 the second step's loss is not finite."""
    run_dir = tmp_path / "run"
    proc = fork_grow(tmp_path, f"hydra.run.dir={run_dir}", "tracking=off", "checkpoint.every_steps=1",
                    "schedule.stages.0.lr.peak=1e30", "schedule.stages.0.lr.warmup_steps=0", "train.grad_clip=0",
                    cache=data_cache, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("grow: training diverged: stage s1 step ") and "the training loss is" in line
    latest = json.loads((run_dir / "checkpoints" / "latest").read_text())["path"]
    assert latest in line  # says which checkpoint stays the newest
    steps = sorted(p.name for p in (run_dir / "checkpoints" / "0-s1").iterdir())
    assert steps[-1] == latest.split("/")[-1]  # nothing written after it
    diverged_at = int(line.split(" step ")[1].split(":")[0])
    assert int(steps[-1].removeprefix("step_")) == diverged_at - 1


@pytest.mark.slow
def test_settings_pin_only_once_a_run_trained_and_lost_checkpoints_are_not_silently_restarted(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a directory whose run never trained (say, refused by a data error) does not pin its settings
    (run_dir / "config.json").write_text(json.dumps({"seed": 123}))
    common = (f"hydra.run.dir={run_dir}", "tracking=off", "budget.max_tokens=1024")
    fork_grow(tmp_path, *common, cache=data_cache)
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 0
    spent = read_summary(run_dir)["totals"]["tokens"]
    assert spent == 1024
    # trained: another seed is refused, before Hydra rewrites the run's .hydra/
    hydra_files = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    proc = fork_grow(tmp_path, *common, "seed=5", cache=data_cache, check=False)
    assert proc.returncode == 2 and "seed: differs from the run already in" in proc.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    # every checkpoint gone, the run's other files still there: refuse to start over
    shutil.rmtree(run_dir / "checkpoints")
    proc = fork_grow(tmp_path, *common, cache=data_cache, check=False)
    assert proc.returncode == 1 and "refusing to start from scratch" in proc.stderr
    assert "checkpoint.allow_fresh_start=true" in proc.stderr.strip().splitlines()[-1]
    fork_grow(tmp_path, *common, "checkpoint.allow_fresh_start=true", cache=data_cache)
    assert read_summary(run_dir)["totals"]["tokens"] == 1024
    # a damaged config.json of a run that trained: one line, not a traceback
    (run_dir / "config.json").write_text('{"seed": 0, "mod')
    proc = fork_grow(tmp_path, *common, cache=data_cache, check=False)
    assert proc.returncode == 2 and "config.json is damaged" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_second_run_on_a_busy_directory_is_refused_before_it_writes(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    args = ["run", "schedule=tiny", f"hydra.run.dir={run_dir}", "tracking=off", "engine.threads=1",
            f"data.cache_dir={data_cache}"]
    env = {**os.environ, "GROW_FAILPOINTS": "step.done=sleep:0.5", "OMP_NUM_THREADS": "1"}  # a slow first run
    first = subprocess.Popen(grow_cmd(*args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").stat().st_size:
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.5)
        hydra_files = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        second = fork_grow(tmp_path, f"hydra.run.dir={run_dir}", "tracking=off", "seed=3", cache=data_cache,
                          check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"grow: config error: run_dir: {run_dir} is in use by another grow run (pid {first.pid}); "
            "wait for it or pick another hydra.run.dir")
        assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_no_file_of_a_run_holds_a_tracking_password(tmp_path, data_cache):
    """tracking.uri's password and a secret environment value reach neither the run's files
    (.hydra/ included: grow run writes it itself, masked) nor its output."""
    run_dir = tmp_path / "run"
    secret = "s3cret-Value-42"
    proc = fork_grow(tmp_path, f"hydra.run.dir={run_dir}", "budget.max_tokens=1024",
                     "tracking.uri=http://bob:hunter2pass@127.0.0.1:9/", "tracking.experiment=${oc.env:RUN_SECRET_TOKEN}",
                     cache=data_cache, check=False, env={"RUN_SECRET_TOKEN": secret})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hunter2pass" not in proc.stdout + proc.stderr and secret not in proc.stdout + proc.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config.json"} <= {
        str(p.relative_to(run_dir)) for p in files}
    for path in files:
        data = path.read_bytes()
        assert b"hunter2pass" not in data and secret.encode() not in data, path
    assert "http://bob:***@127.0.0.1:9/" in (run_dir / ".hydra" / "config.yaml").read_text()
