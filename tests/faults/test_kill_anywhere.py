"""SIGKILL a tiny run at named failpoints and at random moments, resume each time, and
require the same final weights (bitwise, fp32 CPU) and the same ledger as a run that was
never interrupted, with `latest` never pointing at a partial checkpoint. Each run is a
forked child of a process that has imported torch already (conftest.py says why)."""
from __future__ import annotations

import random
import signal
import subprocess

import pytest

from orchestrator.faults import FAILPOINTS

from .conftest import assert_same_as_reference, latest_is_complete, run_forked, start_forked

pytestmark = pytest.mark.slow


def test_kill_at_every_failpoint_then_resume(tmp_path, data_cache, reference):
    """One run directory, killed once at each named place (some more than once), resumed
    after each kill; then finished."""
    run_dir = tmp_path / "run"
    plan = [f"{name}@{n}" for name in FAILPOINTS for n in ((1, 4) if name.startswith("checkpoint") else (1,))]
    plan += ["step.done@20", "growth.done@1"]  # after a resume the counters restart
    kills = 0
    for point in plan:
        proc = run_forked(run_dir, data_cache, point)
        if proc.returncode == 0:
            continue  # the point is no longer on this run's path
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        kills += 1
        latest_is_complete(run_dir)
    last = run_forked(run_dir, data_cache)
    assert last.returncode == 0, last.stderr[-2000:]
    print(f"failpoint kills survived: {kills}")
    assert kills >= 8
    assert_same_as_reference(run_dir, reference)


def test_kill_at_random_moments_then_resume(tmp_path, data_cache, reference):
    """SIGKILL at random times (start-up, mid-step, mid-checkpoint, mid-growth...) until
    the run gets through; fresh trials until at least 12 kills, each trial checked. Delays
    scale with how long an uninterrupted run takes on this machine, and a trial stops
    being killed after 4 kills, so a slow machine cannot make the test run forever."""
    rng = random.Random(1234)
    duration = reference[2]
    kills, trials = 0, 0
    while kills < 12 and trials < 16:
        trials += 1
        run_dir = tmp_path / f"run{trials}"
        finished, in_trial = False, 0
        while not finished:
            proc = start_forked(run_dir, data_cache)
            delay = rng.uniform(0.15, 0.6) * duration if in_trial < 4 else None
            try:
                proc.wait(timeout=delay)
                assert proc.returncode == 0, proc.stderr[-2000:]
                finished = True
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills, in_trial = kills + 1, in_trial + 1
                latest_is_complete(run_dir)
        assert_same_as_reference(run_dir, reference)
    print(f"random kills survived: {kills} over {trials} trials")
    assert kills >= 12


def test_failpoint_actions_raise_sleep_and_refuse_unknown(monkeypatch):
    from orchestrator import faults

    def arm(spec):
        monkeypatch.setenv("GROW_FAILPOINTS", spec)
        monkeypatch.setattr(faults, "_armed", None)
        monkeypatch.setattr(faults, "_hits", {})
    arm("a@2=raise")
    faults.failpoint("a")  # 1st hit passes
    with pytest.raises(faults.InjectedFault, match="hit 2"):
        faults.failpoint("a")
    arm("b@2=sleep:0.2")
    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    for _ in range(4):
        faults.failpoint("b")
    assert slept == [0.2, 0.2, 0.2]  # every hit from the 2nd on
    arm("c=explode")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        faults.failpoint("c")
