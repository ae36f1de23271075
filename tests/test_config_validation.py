"""Bad configs are refused before any compute, in one line that names the key."""
from __future__ import annotations

import subprocess

import pytest

from orchestrator.cli import _precheck

from .conftest import grow_cmd

BAD = [
    ("model.foo=1", "model.foo", "unknown key"),
    ("+schedule.stages.0.bogus=1", "schedule.stages.0.bogus", "unknown key"),
    ("schedule.stages.1.shape.hidden=32", "schedule.stages.1.shape.hidden", "cannot shrink"),
    ("schedule.stages.2.shape.layers=1", "schedule.stages.2.shape.layers", "cannot shrink"),
    ("schedule.stages.0.shape.heads=3", "schedule.stages.0.shape.heads", "does not divide hidden"),
    ("schedule.stages.0.tokens=0", "schedule.stages.0.tokens", "> 0"),
    ("schedule.stages.0.tokens=100", "schedule.stages.0.tokens", "less than one step"),
    ("schedule.stages.0.tokens=abc", "schedule.stages.0.tokens", "converted to Integer"),
    ("schedule.stages.1.shape.heads=8", "schedule.stages.1.shape.heads", "head_dim"),
    ("schedule.stages.0.shape.kv_heads=3", "schedule.stages.0.shape.kv_heads", "does not divide heads"),
    ("schedule.stages.1.growth.operator=bogus", "schedule.stages.1.growth.operator", "unknown growth operator"),
    ("schedule.stages.1.growth.ramp_steps=400", "schedule.stages.1.growth.ramp_steps", "below the stage"),
    ("schedule.stages.0.lr.peak=null", "schedule.stages.0.lr.peak", "no learning rate to inherit"),
    ("schedule.stages.0.lr.decay=step", "schedule.stages.0.lr.decay", "allowed: cosine"),
    ("schedule.stages.0.batch_size=-8", "schedule.stages.0.batch_size", "> 0"),
    ("schedule.stages.0.layout.dp=2", "schedule.stages.0.layout", "engine.name=local"),
    ("+schedule.stages.0.mixture.nope=1.0", "schedule.stages.0.mixture.nope", "no such source"),
    ("model.norm=batchnorm", "model.norm", "allowed: rmsnorm, layernorm"),
    ("engine.dtype=fp16", "engine.dtype", "allowed: fp32, bf16"),
    ("tracking.uri=ftp://host/x", "tracking.uri", "no supported scheme"),
    ("budget.max_usd=-1", "budget.max_usd", "> 0"),
    ("data.val_fraction=1.5", "data.val_fraction", "(0, 1)"),
    ("data=files", "data.sources.mine.paths", "at least one file"),
    ("data.sources.stdlib.kind=web", "data.sources.stdlib.kind", "allowed: embedded, files"),
    ("data.tokenizer.kind=wordpiece", "data.tokenizer.kind", "allowed: byte, bpe"),
    ("train.beta2=1.5", "train.beta2", "[0, 1)"),
    ("schedule=nope", "", "Could not find 'schedule/nope'"),
]


@pytest.mark.parametrize("override,key,why", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_the_key(override, key, why, capsys):
    assert _precheck([override]) == 2  # on the default schedule
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("grow: config error: ")
    assert key in err and why in err, err


def test_missing_data_path_is_refused(tmp_path, capsys):
    assert _precheck(["schedule=tiny", "data=files", f"data.sources.mine.paths=[{tmp_path}/nope]"]) == 2
    assert "data.sources.mine.paths.0" in capsys.readouterr().err


def test_good_configs_pass():
    assert _precheck(["schedule=tiny"]) is None
    assert _precheck(["schedule=default", "model=gpt_tiny"]) is None


def test_cli_exits_2_before_creating_anything(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(grow_cmd("run", f"hydra.run.dir={run_dir}", "schedule.stages.1.shape.hidden=32"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "grow: config error: schedule.stages.1.shape.hidden: cannot shrink (64 -> 32); allowed: >= 64"]
    assert not run_dir.exists() and not (tmp_path / "mlflow.db").exists()
