"""Shared helpers: run the real `grow` CLI in a subprocess, the way users do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenized-corpus cache for the whole session (tokenizing is done once)."""
    return tmp_path_factory.mktemp("data-cache")


def grow_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def run_grow(cwd: Path, *overrides: str, cache: Path, timeout: int = 600, check: bool = True,
             schedule: str = "tiny") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = grow_cmd("run", f"schedule={schedule}", f"data.cache_dir={cache}", "engine.threads=1",
                   *overrides)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"grow failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def one_torch_thread():
    """Exactness tests on one thread: reductions then do not depend on the machine's cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
