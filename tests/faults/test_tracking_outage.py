"""MLflow outages and ends: a tracking server down at start or killed mid-run costs no
training and loses or duplicates no metric; crashes and signals mark runs FAILED/KILLED."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.checkpoint.canonical import latest_checkpoint, read_meta

from ..conftest import read_summary
from .conftest import run_forked, start_forked

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on loopback, over a sqlite store that outlives restarts."""

    def __init__(self, root: Path):
        self.port, self.store = _free_port(), f"sqlite:///{root / 'server.db'}"
        self.artifacts = root / "artifacts"  # not the server's cwd (./mlartifacts)
        self.uri, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store, "--host",
             "127.0.0.1", "--port", str(self.port), "--workers", "1", "--artifacts-destination", str(self.artifacts)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 240  # seen taking 36-100 s under load
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError("mlflow server did not come up")

    def kill(self) -> None:
        import os
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _check_complete_and_unique(uri: str, run_dir: Path) -> int:
    """Every train/loss point of every stage is in MLflow exactly once; returns the count."""
    summary, client = read_summary(run_dir), MlflowClient(uri)
    total = 0
    for st in summary["stages"]:
        steps = [m.step for m in client.get_metric_history(st["mlflow_run_id"], "train/loss")]
        assert len(steps) == len(set(steps)) == st["steps"], st["name"]
        total += len(steps)
        assert client.get_run(st["mlflow_run_id"]).info.status == "FINISHED"
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert len(client.get_metric_history(parent.info.run_id, "train/loss")) == total
    return total


def test_server_down_at_start_then_dies_mid_run(tmp_path, data_cache):
    server = MlflowServer(tmp_path)
    tracking = [f"tracking.uri={server.uri}", "tracking.enabled=true", "tracking.flush_every_s=0.5"]

    # 1. the server is down for the whole run: training finishes, metrics wait on disk
    down = tmp_path / "down"
    proc = run_forked(down, data_cache, extra=tracking)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unreachable" in proc.stdout + proc.stderr and "not sent to MLflow yet" in proc.stdout + proc.stderr
    assert read_summary(down)["stages"][-1]["val_loss"] is not None

    server.start()
    try:
        # 2. the server dies in the middle of a run (after stage 1's metrics went out)
        mid = tmp_path / "mid"
        run = start_forked(mid, data_cache, extra=tracking)
        deadline = time.time() + 300
        while time.time() < deadline:
            ckpt = latest_checkpoint(mid) if (mid / "checkpoints" / "latest").exists() else None
            if ckpt and read_meta(ckpt)["stage_index"] >= 1:
                break
            time.sleep(0.05)
        server.kill()
        run.wait(timeout=600)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-2000:]  # training went on
        assert "unreachable" in out
        server.start()
        # 3. back up: `grow run` on each finished directory sends what is missing, once
        for run_dir in (down, mid):
            again = run_forked(run_dir, data_cache, extra=tracking)
            assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-2000:]
            assert _check_complete_and_unique(server.uri, run_dir) == 80
            info = json.loads((run_dir / "tracking.json").read_text())
            assert info["sent_offset"] == (run_dir / "metrics.jsonl").stat().st_size
        assert {r.info.run_name for r in MlflowClient(server.uri).search_runs(
            [MlflowClient(server.uri).get_experiment_by_name("growth").experiment_id])} >= {"s1", "s2", "s3"}
    finally:
        server.kill()


def test_crash_marks_failed_and_signal_marks_killed(tmp_path, data_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = [f"tracking.uri={uri}", "tracking.enabled=true"]
    crashed = tmp_path / "crashed"
    proc = run_forked(crashed, data_cache, "step.done@40=raise", extra=tracking)
    assert proc.returncode != 0 and "failpoint step.done" in proc.stderr
    client = MlflowClient(uri)
    info = json.loads((crashed / "tracking.json").read_text())
    assert client.get_run(info["parent_run_id"]).info.status == "FAILED"
    assert client.get_run(info["stage_run_ids"]["s2"]).info.status == "FAILED"

    stopped = tmp_path / "stopped"
    run = start_forked(stopped, data_cache, extra=tracking)
    deadline = time.time() + 300
    while not (stopped / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 128 + signal.SIGTERM
    info = json.loads((stopped / "tracking.json").read_text())
    assert client.get_run(info["parent_run_id"]).info.status == "KILLED"
    # and the next run continues the same MLflow runs to FINISHED
    assert run_forked(stopped, data_cache, extra=tracking).returncode == 0
    assert client.get_run(info["parent_run_id"]).info.status == "FINISHED"
    assert _check_complete_and_unique(uri, stopped) == 80
