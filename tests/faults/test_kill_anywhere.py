"""SIGKILL a tiny run at named failpoints and at random moments, resume each time, and
require the same final weights (bitwise, fp32 CPU) and the same ledger as a run that was
never interrupted, with `latest` never pointing at a partial checkpoint."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator.checkpoint import verify
from orchestrator.faults import FAILPOINTS

from ..conftest import grow_cmd, read_summary

pytestmark = pytest.mark.slow
ARGS = ("schedule=tiny", "tracking=off", "engine.threads=1", "checkpoint.every_steps=3",
        "train.eval_every_steps=8")


def _cmd(run_dir: Path, cache: Path) -> list[str]:
    return grow_cmd("run", *ARGS, f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}")


def _env(failpoints: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GROW_FAILPOINTS", None)
    if failpoints:
        env["GROW_FAILPOINTS"] = failpoints
    return env


def _final_weights(run_dir: Path) -> dict:
    summary = read_summary(run_dir)
    return load_file(Path(summary["stages"][-1]["checkpoint"]) / "model.safetensors")


def _ledger(run_dir: Path) -> list[tuple]:
    return [(s["name"], s["tokens"], s["steps"], s["flops"]) for s in read_summary(run_dir)["stages"]]


def _latest_is_complete(run_dir: Path) -> None:
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        import json
        verify(run_dir / "checkpoints" / json.loads(pointer.read_text())["path"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(run_dir, data_cache), env=_env(), check=True, capture_output=True, timeout=600)
    return _final_weights(run_dir), _ledger(run_dir)


def _assert_same_as_reference(run_dir: Path, reference) -> None:
    weights, ledger = reference
    got = _final_weights(run_dir)
    assert got.keys() == weights.keys()
    for name in weights:
        assert got[name].equal(weights[name]), f"{name} differs after kills and resumes"
    assert _ledger(run_dir) == ledger  # every token, step and FLOP counted once


def test_kill_at_every_failpoint_then_resume(tmp_path, data_cache, reference):
    """One run directory, killed once at each named place (some more than once), resumed
    after each kill; then finished."""
    run_dir = tmp_path / "run"
    plan = [f"{name}@{n}" for name in FAILPOINTS for n in ((1, 4) if name.startswith("checkpoint") else (1,))]
    plan += ["step.done@20", "growth.done@1"]  # after a resume the counters restart
    kills = 0
    for point in plan:
        proc = subprocess.run(_cmd(run_dir, data_cache), env=_env(point), capture_output=True,
                              text=True, timeout=600)
        if proc.returncode == 0:
            continue  # the point is no longer on this run's path
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        kills += 1
        _latest_is_complete(run_dir)
    subprocess.run(_cmd(run_dir, data_cache), env=_env(), check=True, capture_output=True, timeout=600)
    assert kills >= 8
    _assert_same_as_reference(run_dir, reference)


def test_kill_at_random_moments_then_resume(tmp_path, data_cache, reference):
    """SIGKILL at random times (start-up, mid-step, mid-checkpoint, mid-growth...) until
    the run gets through; fresh trials until at least 12 kills, each trial checked."""
    rng = random.Random(1234)
    kills, trials = 0, 0
    while kills < 12 and trials < 8:
        trials += 1
        run_dir = tmp_path / f"run{trials}"
        finished = False
        while not finished:
            proc = subprocess.Popen(_cmd(run_dir, data_cache), env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            try:
                proc.wait(timeout=rng.uniform(0.5, 6.0))
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
                finished = True
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                _latest_is_complete(run_dir)
        _assert_same_as_reference(run_dir, reference)
    assert kills >= 12
