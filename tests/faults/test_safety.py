"""Secrets stay out of MLflow, and files the project writes are not world-writable."""
from __future__ import annotations

import os
import stat
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.secrets import redact_config as redact

from ..conftest import read_summary
from .conftest import run_cmd, run_env

pytestmark = pytest.mark.slow
SECRET = "s3cr3t-Value-42"


def test_redact_hides_secret_keys_and_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = redact({"cluster.name": SECRET, "db_password": "x", "seed": 3, "name": "ok"})
    assert out == {"cluster.name": "***", "db_password": "***", "seed": 3, "name": "ok"}


def test_secret_from_environment_never_reaches_mlflow_and_files_are_private(tmp_path, data_cache):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**run_env(), "MY_API_TOKEN": SECRET}
    run_dir = tmp_path / "run"
    proc = subprocess.run(run_cmd(run_dir, data_cache) + [f"tracking.uri={uri}", "tracking.enabled=true",
                                                            "cluster.name=${oc.env:MY_API_TOKEN}"],
                          env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(0))  # a careless shell umask
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(uri)
    summary = read_summary(run_dir)
    for run_id in [summary["mlflow"]["parent_run_id"], *(s["mlflow_run_id"] for s in summary["stages"])]:
        params = client.get_run(run_id).data.params
        assert SECRET not in " ".join(params.values())
    assert client.get_run(summary["mlflow"]["parent_run_id"]).data.params["cluster.name"] == "***"
    writable = [p for p in [run_dir, *run_dir.rglob("*"), *data_cache.rglob("*")]
                if p.stat().st_mode & (stat.S_IWOTH | stat.S_IWGRP) and not p.is_symlink()]
    assert writable == []
