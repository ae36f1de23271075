"""The deepspeed engine (Megatron TP + DeepSpeed PP + ZeRO-1, CPU/gloo) against the local
engine: per-step losses with clipping active, growth masks in flight and Adam moments
loaded at step 3; exported canonical state; a dead rank ends the job fast; a three-stage
schedule across layouts matches the local run (impossible layouts: tests/config/test_refusals.py).

Multi-process runs cost ~25-70 s each on 2 cores, so they are few and marked slow. The
`grow run` drivers are forked from a process that has imported torch already (conftest's
fork_grow; the ranks they launch are fresh torchrun processes), except one refusal that
goes through the real `grow` script.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("megatron.core")
import psutil  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ..conftest import REPO, fork_grow, grow_cmd, read_summary  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from orchestrator.schedule import ResolvedStage
from parallel_worker import case_arg, case_config, case_spec, case_start, run_case  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(REPO)}


def torchrun(world: int, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           "--max-restarts", "0", str(REPO / "tests" / "engines" / "parallel_worker.py"), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# every parallel_worker case the tests below compare: (tp, pp, dp, tied, micro, zero, dtype)
TRAINING = [
    (1, 1, 2, 1, 2, 1, "fp32"), (2, 1, 1, 0, 2, 1, "fp32"),  # world 2
    (2, 2, 1, 0, 2, 1, "fp32"), (2, 1, 2, 1, 2, 2, "fp32"),  # world 4 (ZeRO-2: no pipeline)
    (2, 2, 2, 1, 2, 1, "fp32"), (2, 2, 2, 0, 2, 1, "fp32"),  # world 8
]
BF16 = (1, 2, 2, 0, 2, 1, "bf16")  # world 4


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """`worker_runs(case)`: the output directory of a parallel_worker case. The first test that
    asks for a world size launches every case of that size in one torchrun (a launch costs
    ~25 s of imports on 2 cores; the cases themselves a few seconds each)."""
    done: dict[tuple, tuple[Path, subprocess.CompletedProcess]] = {}

    def out_dir(case: tuple) -> Path:
        if case not in done:
            world = case[0] * case[1] * case[2]
            group = [c for c in (*TRAINING, BF16) if c[0] * c[1] * c[2] == world]
            dirs = {c: tmp_path_factory.mktemp("-".join(map(str, c))) for c in group}
            proc = torchrun(world, *(case_arg(dirs[c], *c) for c in group), timeout=300 + 150 * len(group))
            done.update({c: (dirs[c], proc) for c in group})
        out, proc = done[case]
        assert proc.returncode == 0, proc.stderr[-4000:]
        return out
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("case", TRAINING, ids=["dp2-tied", "tp2-untied", "tp2pp2-untied", "tp2dp2-tied-zero2",
                                                "tp2pp2dp2-tied", "tp2pp2dp2-untied"])
def test_training_matches_local_engine(worker_runs, case):
    from orchestrator.engines.local import LocalEngine
    from orchestrator.engines.parallel_model import split_dim

    tp, pp, dp, tied, _, _, _ = case
    out = worker_runs(case)
    spec = case_spec(bool(tied))
    cfg, stage = case_config()
    local = LocalEngine(cfg, ResolvedStage.alone(stage, spec))
    want = run_case(local, spec)
    assert min(want["grad_norms"]) > cfg.train.grad_clip  # clipping is active on every step
    worst = 0.0
    for rank in range(tp * pp * dp):
        got = json.loads((out / f"result-{rank}.json").read_text())
        worst = max([worst, *(abs(a - b) / abs(b) for a, b in zip(got["losses"], want["losses"]))])
        for a, b in zip(got["losses"], want["losses"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (rank, got["losses"], want["losses"])
        assert abs(got["val_loss"] - want["val_loss"]) <= 1e-5 * want["val_loss"]
        assert got["step"] == 8
        # each rank read from the checkpoint files only the TP slices it owns
        if tp > 1:
            assert all(split_dim(n) is None for n in got["full_reads"]), got["full_reads"]
    print(f"world {tp * pp * dp}: worst relative loss difference {worst:.1e} over {len(want['losses'])} steps")
    # the shares the ranks export together are the local engine's canonical state
    state, moments, _ = local.export()
    shared, shared_m = shares(out, "")
    written = sum(len(load_file(f)) for f in glob.glob(str(out / "state-*.safetensors")))
    assert written == len(shared)  # every tensor written by exactly one rank
    assert set(shared) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(shared[k], v, rtol=1e-4, atol=2e-6)
        for kind in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(shared_m[f"{kind}.{k}"], moments[kind][k], rtol=1e-4, atol=1e-8)


def shares(out: Path, prefix: str) -> tuple[dict, dict]:
    """The canonical state and moments all ranks exported together."""
    state, moments = {}, {}
    for f in glob.glob(str(out / f"{prefix}state-*.safetensors")):
        state.update(load_file(f))
    for f in glob.glob(str(out / f"{prefix}moments-*.safetensors")):
        moments.update(load_file(f))
    return state, moments


@pytest.mark.slow
def test_bf16_keeps_fp32_masters_and_tracks_the_fp32_run(worker_runs):
    """bf16 (the GPU path's dtype; DeepSpeed's BF16 optimizer, here on gloo) with a pipeline
    and ZeRO-1 over DP: the optimizer's fp32 masters and moments take the canonical state
    bit for bit, per-step losses stay within bf16 rounding of the fp32 local engine, and
    the exported state is the fp32 masters, not the bf16 copies."""
    from orchestrator.engines.local import LocalEngine

    out = worker_runs(BF16)
    spec = case_spec(False)
    start_state, start_moments, _, _ = case_start(spec)
    loaded, loaded_m = shares(out, "loaded-")
    assert set(loaded) == set(start_state)
    for k, v in start_state.items():
        assert torch.equal(loaded[k], v), k
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded_m[f"{kind}.{k}"], start_moments[kind][k]), (kind, k)
    cfg, stage = case_config()
    want = run_case(LocalEngine(cfg, ResolvedStage.alone(stage, spec)), spec)
    got = json.loads((out / "result-0.json").read_text())
    worst = max(abs(a - b) / b for a, b in zip(got["losses"], want["losses"], strict=True))
    print(f"bf16 vs fp32: worst relative loss difference {worst:.1e}")
    assert worst < 1e-3 and abs(got["val_loss"] - want["val_loss"]) < 1e-2 * want["val_loss"]
    assert got["losses"] != want["losses"]  # it really ran in bf16
    final, _ = shares(out, "")
    matrices = [k for k, v in final.items() if v.ndim == 2]
    assert all(final[k].dtype == torch.float32 for k in final)
    assert all((final[k].bfloat16().float() != final[k]).any() for k in matrices)  # fp32 precision kept


def test_gpu_engine_without_a_visible_gpu_is_refused_before_any_process(tmp_path, data_cache):
    proc = fork_grow(tmp_path, "engine=deepspeed_gpu", f"hydra.run.dir={tmp_path / 'run'}", cache=data_cache,
                     check=False, env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, whatever the machine has
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("grow: config error: engine.device: cuda, but no CUDA device is visible on this machine; "
                           "allowed here: cpu, auto\n")
    assert "launching" not in proc.stdout and not (tmp_path / "run").exists()  # refused by validation


SMALL = ["tracking.enabled=false", "growth.ramp_steps=8", *[f"schedule.stages.{i}.{k}" for i in range(3) for k in
         ("tokens=49152", "lr.warmup_steps=4")]]
LAYOUTS = ["schedule.stages.0.layout.dp=2", "schedule.stages.1.layout.tp=2", "schedule.stages.1.layout.dp=2",
           "schedule.stages.2.layout.tp=2", "schedule.stages.2.layout.pp=2", "schedule.stages.2.layout.dp=2"]


ENDS_WITHIN_S = 150


@pytest.mark.slow
def test_killed_rank_ends_the_job_fast(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    # the collectives' timeout is far beyond how long the test waits for the job to end: an
    # end within the wait is the rank's death noticed, not the other rank timing out
    cmd = grow_cmd("run", "schedule=default", f"data.cache_dir={data_cache}", "engine=deepspeed",
                   f"hydra.run.dir={run_dir}", f"engine.timeout_s={3 * ENDS_WITHIN_S}", *SMALL,
                   "schedule.stages.0.tokens=983040", "schedule.stages.0.layout.dp=2")
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size == 0):
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            time.sleep(0.5)
        ranks = [p for p in psutil.Process(driver.pid).children(recursive=True)
                 if "orchestrator.run.launch" in " ".join(p.cmdline()) and "rank_exits" not in " ".join(p.cmdline())]
        assert len(ranks) == 2
        victim = max(ranks, key=lambda p: p.pid)
        os.kill(victim.pid, signal.SIGKILL)
        try:
            out, _ = driver.communicate(timeout=ENDS_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still ran {ENDS_WITHIN_S} s after a rank was killed")
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0
    # the driver's last line names the rank and the signal, and advises a rerun (a kill: it helps)
    line = next((x for x in out.splitlines() if x.startswith("grow: stage small failed")), out[-3000:])
    assert line.startswith("grow: stage small failed: rank "), line
    assert f"(pid {victim.pid}) was killed by SIGKILL (signal 9; out of memory?" in line, line
    assert line.endswith("run the same command again to resume from the last checkpoint"), line


@pytest.fixture(scope="module")
def local_default_run(tmp_path_factory, data_cache) -> dict:
    """The summary of SMALL's three-stage schedule on the local engine (fp32)."""
    cwd = tmp_path_factory.mktemp("local")
    fork_grow(cwd, *SMALL, "hydra.run.dir=local", cache=data_cache, schedule="default")
    return read_summary(cwd / "local")


@pytest.mark.slow
def test_three_stage_schedule_across_layouts_matches_local(tmp_path, data_cache, local_default_run):
    fork_grow(tmp_path, *SMALL, "engine=deepspeed", *LAYOUTS, "hydra.run.dir=ds", cache=data_cache,
              schedule="default", timeout=900)
    want, got = local_default_run, read_summary(tmp_path / "ds")
    assert got["status"] == "complete"
    for w, g in zip(want["stages"], got["stages"], strict=True):
        assert abs(g["val_loss"] - w["val_loss"]) <= 1e-5 * w["val_loss"], (w, g)
        if g["growth"]:
            assert abs(g["growth"]["val_loss_after"] - g["growth"]["val_loss_before"]) <= 1e-5
    assert [s["layout"] for s in got["stages"]] == [{"tp": 1, "pp": 1, "dp": 2}, {"tp": 2, "pp": 1, "dp": 2},
                                                    {"tp": 2, "pp": 2, "dp": 2}]


@pytest.mark.slow
def test_three_stage_schedule_in_bf16_checks_growth_and_writes_fp32(tmp_path, data_cache, local_default_run):
    """The GPU path's dtype end to end (on gloo here): bf16 stages on three layouts, growth
    checked in bf16, fp32 masters in every checkpoint, losses near the fp32 run's."""
    layouts = ["schedule.stages.0.layout.dp=2", "schedule.stages.1.layout.tp=2", "schedule.stages.2.layout.pp=2"]
    fork_grow(tmp_path, *SMALL, "engine=deepspeed", "engine.dtype=bf16", *layouts, "hydra.run.dir=ds",
              cache=data_cache, schedule="default", timeout=900)
    got = read_summary(tmp_path / "ds")
    assert got["status"] == "complete"
    for w, g in zip(local_default_run["stages"], got["stages"], strict=True):
        assert abs(g["val_loss"] - w["val_loss"]) <= 2e-2 * w["val_loss"], (w, g)
        if g["growth"]:
            assert g["growth"]["check_dtype"] == "bf16"
            assert abs(g["growth"]["val_loss_after"] - g["growth"]["val_loss_before"]) <= 5e-3
    final = sorted((tmp_path / "ds" / "checkpoints").glob("2-*/step_*"))[-1]
    weights = {}
    for f in final.glob("model*.safetensors"):
        weights.update(load_file(f))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    assert any((t.bfloat16().float() != t).any() for t in weights.values() if t.ndim == 2)  # masters, not bf16


def test_lazy_checkpoint_reads_slices(tmp_path):
    """A rank reads its TP slice of a tensor from the canonical files without the rest."""
    from safetensors.torch import save_file

    from orchestrator.checkpoint.canonical import LazyTensors

    t = {"a": torch.randn(6, 4), "b": torch.randn(3, 8)}
    save_file({f"exp_avg.{k}": v for k, v in t.items()}, tmp_path / "optimizer-00000-of-00002.safetensors")
    save_file({"exp_avg_sq.a": t["a"] * 2}, tmp_path / "optimizer-00001-of-00002.safetensors")
    lazy = LazyTensors(sorted(tmp_path.glob("optimizer-*")), "exp_avg.")
    assert sorted(lazy) == ["a", "b"]
    for name, v in t.items():
        for dim in (0, 1):
            for parts in (1, 2):
                for i in range(parts):
                    assert torch.equal(lazy.slice(name, dim, i, parts), v.chunk(parts, dim=dim)[i])
        assert torch.equal(lazy[name], v)


ONLY_SMALL = ["run.only_stage=small", "checkpoint.every_steps=8"]


@pytest.fixture(scope="module")
def local_small_stage(tmp_path_factory, data_cache) -> dict:
    """The summary of SMALL's first stage alone on the local engine (fp32)."""
    cwd = tmp_path_factory.mktemp("local-small")
    fork_grow(cwd, *SMALL, *ONLY_SMALL, "hydra.run.dir=local", cache=data_cache, schedule="default")
    return read_summary(cwd / "local")["stages"][0]


@pytest.mark.slow
def test_crash_and_resume_reads_slices_and_matches_local(tmp_path, data_cache, monkeypatch, local_small_stage):
    """A TP2 stage crashes after its step-8 checkpoint; the rerun resumes every rank from
    its slices of the sharded canonical checkpoint and ends on the local engine's loss."""
    only = ONLY_SMALL
    args = [*SMALL, *only, "engine=deepspeed", "schedule.stages.0.layout.tp=2", "hydra.run.dir=ds"]
    monkeypatch.setenv("GROW_FAILPOINTS", "step.done@12=raise")
    crashed = fork_grow(tmp_path, *args, cache=data_cache, schedule="default", check=False, timeout=300)
    assert crashed.returncode != 0 and "failpoint step.done" in crashed.stdout + crashed.stderr
    monkeypatch.delenv("GROW_FAILPOINTS")
    resumed = fork_grow(tmp_path, *args, cache=data_cache, schedule="default", timeout=300)
    assert "resuming stage small at step 8" in resumed.stdout
    want, got = local_small_stage, read_summary(tmp_path / "ds")["stages"][0]
    assert got["steps"] == want["steps"] == 24
    assert abs(got["val_loss"] - want["val_loss"]) <= 1e-5 * want["val_loss"], (want, got)


def test_resume_on_a_different_layout_reads_the_same_data(tmp_path, data_cache, monkeypatch, local_small_stage):
    """A DP2 stage dies after its step-8 checkpoint; it resumes as TP2 (another world
    size and layout) through the canonical checkpoint and ends on the local engine's loss."""
    only = ONLY_SMALL
    first = [*SMALL, *only, "engine=deepspeed", "schedule.stages.0.layout.dp=2", "hydra.run.dir=ds"]
    monkeypatch.setenv("GROW_FAILPOINTS", "step.done@12=raise")
    crashed = fork_grow(tmp_path, *first, cache=data_cache, schedule="default", check=False, timeout=300)
    assert crashed.returncode != 0
    monkeypatch.delenv("GROW_FAILPOINTS")
    second = [*SMALL, *only, "engine=deepspeed", "schedule.stages.0.layout.tp=2", "hydra.run.dir=ds"]
    resumed = fork_grow(tmp_path, *second, cache=data_cache, schedule="default", timeout=300)
    assert "resuming stage small at step 8" in resumed.stdout
    want, got = local_small_stage, read_summary(tmp_path / "ds")["stages"][0]
    assert got["steps"] == want["steps"] == 24 and got["tokens"] == want["tokens"]
    assert abs(got["val_loss"] - want["val_loss"]) <= 1e-5 * want["val_loss"], (want, got)
