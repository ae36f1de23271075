"""`grow run` across two machines without Slurm: one torchrun agent per machine (here two on
this one), c10d rendezvous at the first machine's address, the store pinned to it
(is_host), one rank each; the whole schedule runs in place and equals the one-process run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from ..conftest import read_summary

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_equal_the_one_process_run(tmp_path, data_cache, tiny_run):
    endpoint = f"127.0.0.1:{_free_port()}"
    run_dir = tmp_path / "run"  # the shared run directory both machines write into
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=two-agents",
         f"--rdzv_conf=is_host={1 if machine == 0 else 0}", "-m", "orchestrator.cli", "run", "schedule=tiny",
         "engine=deepspeed", "engine.threads=1", "tracking=off", f"data.cache_dir={data_cache}",
         f"hydra.run.dir={run_dir}", *(f"schedule.stages.{i}.layout.dp=2" for i in range(3))],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for machine in (1, 0)]  # the second machine may well start first
    outs = [a.communicate(timeout=900)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    got, want = read_summary(run_dir), read_summary(tiny_run[1])
    assert got["status"] == "complete"
    for g, w in zip(got["stages"], want["stages"], strict=True):
        assert abs(g["val_loss"] - w["val_loss"]) <= 1e-5 * w["val_loss"], (g, w)
        assert g["tokens"] == w["tokens"] and g["layout"]["dp"] == 2
    assert json.loads((run_dir / "config.json").read_text())["engine"]["name"] == "deepspeed"
