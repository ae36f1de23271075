"""Shared by the fault tests: the tiny run they break, and the uninterrupted reference.

The runs that are killed and resumed many times start as forked children of a server that
has already imported torch and the orchestrator (tests/forked_grow.py): what is tested is
what a SIGKILL leaves on disk and how the next process resumes from it, not the start of an
interpreter, which `run_cmd` (a real `grow` subprocess) still covers elsewhere."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator.checkpoint.canonical import verify

from ..conftest import grow_cmd, read_summary
from ..forked_grow import ForkedGrow, run_grow_forked, start_fork_server, start_grow

ARGS = ("schedule=tiny", "tracking=off", "engine.threads=1", "checkpoint.every_steps=3",
        "train.eval_every_steps=8")


def run_args(run_dir: Path, cache: Path) -> list[str]:
    return ["run", *ARGS, f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}"]


def run_cmd(run_dir: Path, cache: Path) -> list[str]:
    return grow_cmd(*run_args(run_dir, cache))


def _logs(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-logs"


def start_forked(run_dir: Path, cache: Path, failpoints: str = "", extra: tuple = ()) -> ForkedGrow:
    """The fault tests' run in a forked child (see the module docstring), not waited for."""
    return start_grow(run_args(run_dir, cache) + list(extra), run_dir.parent, run_env(failpoints), _logs(run_dir))


def run_forked(run_dir: Path, cache: Path, failpoints: str = "", extra: tuple = ()) -> ForkedGrow:
    """The fault tests' run in a forked child, to its end; `.returncode`, `.stdout`, `.stderr`."""
    return run_grow_forked(run_args(run_dir, cache) + list(extra), run_dir.parent, run_env(failpoints),
                           _logs(run_dir))


def run_env(failpoints: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GROW_FAILPOINTS", None)
    if failpoints:
        env["GROW_FAILPOINTS"] = failpoints
    return env


def final_weights(run_dir: Path) -> dict:
    summary = read_summary(run_dir)
    return load_file(Path(summary["stages"][-1]["checkpoint"]) / "model.safetensors")


def ledger_of(run_dir: Path) -> list[tuple]:
    return [(s["name"], s["tokens"], s["steps"], s["flops"]) for s in read_summary(run_dir)["stages"]]


def latest_is_complete(run_dir: Path) -> None:
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        verify(run_dir / "checkpoints" / json.loads(pointer.read_text())["path"])


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_cache):
    """(final weights, ledger, seconds the uninterrupted run took)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    start_fork_server()  # not part of the run's time
    start = time.monotonic()
    proc = run_forked(run_dir, data_cache)  # started as the runs it is compared with are
    assert proc.returncode == 0, proc.stderr[-2000:]
    return final_weights(run_dir), ledger_of(run_dir), time.monotonic() - start


def assert_same_as_reference(run_dir: Path, reference) -> None:
    weights, ledger = reference[:2]
    got = final_weights(run_dir)
    assert got.keys() == weights.keys()
    for name in weights:
        assert got[name].equal(weights[name]), f"{name} differs after kills and resumes"
    assert ledger_of(run_dir) == ledger  # every token, step and FLOP counted once


