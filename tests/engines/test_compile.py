"""train.compile: compiled training that survives growth, on both engines.

The local runs go through `grow run` in this process, so dynamo's own counters are read
here: one graph per stage, no graph break, and `error_on_recompile` set during the compiled
run (each stage starts from a fresh dynamo cache, so a second graph inside a stage would
raise). Losses match the eager run step by step, and the runner's growth check passes.
The deepspeed engine is checked under torchrun against the local engine (eager) on
parallel_worker's case, its ramp ending during the run.

Compiling is slow on 2 busy cores (tens of seconds per graph the first time; inductor's
on-disk cache makes later runs faster): these tests are few and marked slow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.budget.machine_peak import cpu_peak_flops, gemm_shapes, matmul_flops, mfu_peak

from ..conftest import REPO, grow_in_process, read_summary

CONFIGS = REPO / "tests" / "configs"
COMMON = ["--config-dir", str(CONFIGS), "schedule=compile_tiny", "tracking=off", "engine.threads=1",
          "train.eval_every_steps=3"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, data_cache):
    """(eager run dir, compiled run dir, graphs compiled, graph breaks) of compile_tiny in this process."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    tmp = tmp_path_factory.mktemp("compile")
    args = [*COMMON, f"data.cache_dir={data_cache}"]
    assert grow_in_process("run", *args, f"hydra.run.dir={tmp / 'eager'}") == 0
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.config.error_on_recompile = True
    try:
        assert grow_in_process("run", *args, "train.compile=true", f"hydra.run.dir={tmp / 'compiled'}") == 0
    finally:
        torch._dynamo.config.error_on_recompile = False
    return (tmp / "eager", tmp / "compiled", counters["stats"]["unique_graphs"] - graphs,
            sum(counters["graph_break"].values()) - breaks)


@pytest.mark.slow
def test_compiled_local_run_matches_eager_across_growth(local_runs):
    eager, compiled, graphs, breaks = local_runs
    assert graphs == 2 and breaks == 0  # one graph per stage (evaluation runs eagerly), no recompile
    got, want = metrics(compiled), metrics(eager)
    for key in ("train/loss", "val/loss"):
        a = [(m["stage"], m["step"], m[key]) for m in got if key in m]
        b = [(m["stage"], m["step"], m[key]) for m in want if key in m]
        assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) >= 4
        for (_, _, x), (_, _, y) in zip(a, b):
            assert abs(x - y) <= 1e-5 * abs(y), (key, a, b)
    growth = read_summary(compiled)["stages"][1]["growth"]
    assert abs(growth["val_loss_after"] - growth["val_loss_before"]) <= 1e-5
    compile_s = [(m["stage"], m["step"], m["perf/compile_s"]) for m in got if "perf/compile_s" in m]
    assert [c[:2] for c in compile_s] == [("s1", 2), ("s2", 8)]  # after each stage's second step
    assert all(c[2] >= 0 for c in compile_s)
    assert not any("perf/compile_s" in m for m in want)
    assert all(0 < m["perf/mfu"] for m in got if "perf/mfu" in m)


@pytest.mark.slow
def test_compiled_deepspeed_engine_matches_local(tmp_path):
    """Two data-parallel ranks (DeepSpeed pipeline engine, ZeRO-1), every layer compiled:
    losses match the eager local engine, all graphs are compiled in the first step and
    none after (the ramp ends in step 3: masks held at one), none breaks."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("megatron.core")
    from orchestrator.engines.local import LocalEngine
    from orchestrator.schedule import ResolvedStage

    sys.path.insert(0, str(Path(__file__).parent))
    import compile_worker
    import parallel_worker

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "0", str(Path(__file__).parent / "compile_worker.py"), str(tmp_path), "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    spec = parallel_worker.case_spec(True)
    cfg, stage = parallel_worker.case_config()
    original = parallel_worker.case_start
    parallel_worker.case_start = compile_worker.ending_ramp_start
    try:
        want = parallel_worker.run_case(LocalEngine(cfg, ResolvedStage.alone(stage, spec)), spec)
    finally:
        parallel_worker.case_start = original
    for rank in range(2):
        got = json.loads((tmp_path / f"result-{rank}.json").read_text())
        for a, b in zip(got["losses"], want["losses"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], want["losses"])
        assert abs(got["val_loss"] - want["val_loss"]) <= 1e-5 * want["val_loss"]
        graphs = got["graphs_after_step"]
        assert graphs[0] > 0 and set(graphs) == {graphs[0]}, graphs
        assert got["graph_breaks"] == 0 and got["compile_s"] >= 0


BAD = [
    (["train.compile=true", "train.compile_mode=reduce-overhead", "engine.device=cpu"], "train.compile_mode"),
    (["train.compile=true", "train.compile_mode=fastest"], "train.compile_mode"),
    (["train.compile=sometimes"], "train.compile"),
]


@pytest.mark.slow
def test_compiled_mixture_of_experts_does_not_recompile(tmp_path, data_cache):
    """A dense stage upcycled into a mixture (tests/configs/schedule/moe_tiny.yaml): the
    routed part runs eagerly (its tokens per expert change every step), the rest compiles
    around it once per stage."""
    import torch._dynamo

    torch._dynamo.config.error_on_recompile = True
    try:
        code = grow_in_process("run", "--config-dir", str(CONFIGS), "schedule=moe_tiny", "tracking=off",
                               "engine.threads=1", f"data.cache_dir={data_cache}", "train.compile=true",
                               f"hydra.run.dir={tmp_path / 'run'}")
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert code == 0
    stages = read_summary(tmp_path / "run")["stages"]
    assert [s["name"] for s in stages] == ["dense", "moe", "moe_more_aux"]
    assert abs(stages[1]["growth"]["val_loss_after"] - stages[1]["growth"]["val_loss_before"]) <= 1e-5
    assert [m["stage"] for m in metrics(tmp_path / "run") if "perf/compile_s" in m] == [s["name"] for s in stages]


def test_compile_without_a_cpu_compiler_refused(tmp_path, data_cache, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    code = grow_in_process("run", *COMMON, f"data.cache_dir={data_cache}", "train.compile=true",
                           "engine.device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no-such-compiler" in err, err
    assert not (tmp_path / "run").exists()


def test_cpu_peak_probe():
    """The measured peak perf/mfu uses on the CPU: positive, measured once per thread count
    (cached), and named in the tracking; a GPU keeps the configured peak."""
    peak = cpu_peak_flops()
    assert peak > 1e8 and cpu_peak_flops() == peak
    assert mfu_peak(0.2, "cpu") == (peak, "measured_cpu_matmul")
    assert mfu_peak(989.0, "cuda") == (989e12, "cluster.peak_tflops_per_gpu")
    assert matmul_flops(64, 32, 16, seconds=0.01) > 0
    shapes = gemm_shapes(hidden=64, ffn=176, vocab=512, q_dim=64, tokens=256)
    assert shapes["ffn_up"] == (256, 64, 176) and shapes["head"] == (256, 64, 512)
    assert torch.get_num_threads() >= 1
