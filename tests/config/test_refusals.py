"""Bad configs are refused before any compute, in one line that names the key."""
from __future__ import annotations

import os
import subprocess

import pytest

from orchestrator.commands.run_job import precheck as _precheck
from orchestrator.config.schema import RunConfig

from ..conftest import grow_cmd
from ..forked_grow import run_grow_forked

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
    ("schedule.stages.0.lr.decay_fraction=0", "schedule.stages.0.lr.decay_fraction", "not in (0, 1]"),
    ("schedule.stages.2.lr.decay=wsd schedule.stages.2.lr.decay_fraction=0.9", "schedule.stages.2.lr.decay_fraction",
     "only the last stage decays under wsd"),
    ("schedule.stages.0.batch_size=-8", "schedule.stages.0.batch_size", "> 0"),
    ("schedule.stages.0.layout.dp=2", "schedule.stages.0.layout", "engine.name=local"),
    ("+schedule.stages.0.mixture.nope=1.0", "schedule.stages.0.mixture.nope", "unknown source 'nope'"),
    ("+schedule.stages.0.mixture.stdlib=0.5", "schedule.stages.0.mixture", "must sum to 1"),
    ("model.norm=batchnorm", "model.norm", "allowed: rmsnorm, layernorm"),
    ("engine.dtype=fp16", "engine.dtype", "allowed: fp32, bf16"),
    ("tracking.uri=ftp://host/x", "tracking.uri", "no supported scheme"),
    ("budget.max_usd=-1", "budget.max_usd", "> 0"),
    ("data.val_fraction=1.5", "data.val_fraction", "(0, 1)"),
    ("data=files", "data.sources.mine.paths", "at least one file"),
    ("data.sources.stdlib.kind=web", "data.sources.stdlib.kind", "allowed: embedded, stdlib_code, stdlib_prose, people_daily, files"),
    ("data.tokenizer.kind=wordpiece", "data.tokenizer.kind", "allowed: byte, bpe"),
    ("train.beta2=1.5", "train.beta2", "[0, 1)"),
    ("schedule=nope", "", "Could not find 'schedule/nope'"),
    ("budget.max_tokens=100", "budget.max_tokens", "below one step"),
    ("budget.max_flops=1000", "budget.max_flops", "below one step"),
    ("budget.max_flops=abc", "budget.max_flops", "converted to Float"),
    ("engine=deepspeed schedule.stages.0.layout.tp=3", "schedule.stages.0.layout.tp", "does not divide heads"),
    ("engine=deepspeed schedule.stages.2.layout.pp=3", "schedule.stages.2.layout.pp", "does not divide layers"),
    ("schedule.stages.1.name=small", "schedule.stages.1.name", "used by two stages"),
    ("schedule.stages.0.name=a/b", "schedule.stages.0.name", "without '/'"),
    ("schedule.stages.0.seq_len=0", "schedule.stages.0.seq_len", "> 0"),
    ("schedule.stages.1.shape.kv_heads=3", "schedule.stages.1.shape.kv_heads", "does not divide heads"),
    ("growth.layer_insert=middle", "schedule.stages.1.growth.layer_insert", "allowed: append, interleave"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps", "> 0"),
    ("train.grad_clip=-1", "train.grad_clip", ">= 0"),
    ("model.init_std=0", "model.init_std", "> 0"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings", "not a valid bool"),
    ("tracking.uri=localhost:5000", "tracking.uri", "no supported scheme"),
]


def test_at_least_30_distinct_bad_configs():
    assert len({b[0] for b in BAD}) >= 30


@pytest.mark.parametrize("override,key,why", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_the_key(override, key, why, capsys):
    assert _precheck(override.split()) == 2  # on the default schedule
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("grow: config error: ")
    assert key in err and why in err, err


def test_missing_data_path_is_refused(tmp_path, capsys):
    assert _precheck(["schedule=tiny", "data=files", f"data.sources.mine.paths=[{tmp_path}/nope]"]) == 2
    assert "data.sources.mine.paths.0" in capsys.readouterr().err


def test_good_configs_pass():
    assert isinstance(_precheck(["schedule=tiny"]), RunConfig)
    assert isinstance(_precheck(["schedule=default", "model=gpt_tiny"]), RunConfig)


@pytest.mark.parametrize("case", ["not-utf8", "no-matching-files", "vocab-too-small"])
def test_data_problems_exit_2_before_training(case, tmp_path):
    """Found by validation, before the run directory (or anything in it) exists."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    args = ["schedule=tiny", "tracking=off", f"data.cache_dir={tmp_path / 'cache'}",
            "data.tokenizer.kind=byte", f"data.sources.mine.paths=[{corpus}]", "data=files"]
    if case == "not-utf8":
        (corpus / "good.txt").write_text("hello world " * 100)
        (corpus / "bad.txt").write_bytes(b"caf\xe9 latin-1 text " * 10)
        expect = ("bad.txt", "UTF-8")
    elif case == "no-matching-files":
        (corpus / "data.bin").write_bytes(b"x")
        args.append("data.sources.mine.glob=*.txt")
        expect = (str(corpus), "no files")
    else:
        for i in range(20):
            (corpus / f"doc{i}.txt").write_text(f"document {i} " * 100)
        args.append("model.vocab_size=128")
        expect = ("model.vocab_size", "below the tokenizer")
    run_dir = tmp_path / "run"
    proc = run_grow_forked(["run", f"hydra.run.dir={run_dir}", *args], tmp_path, dict(os.environ), tmp_path / "logs")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("grow: config error:") and all(e in line for e in expect), line
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_cli_exits_2_before_creating_anything(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(grow_cmd("run", f"hydra.run.dir={run_dir}", "schedule.stages.1.shape.hidden=32"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "grow: config error: schedule.stages.1.shape.hidden: cannot shrink (64 -> 32); allowed: >= 64"]
    assert not run_dir.exists() and not (tmp_path / "mlflow.db").exists()
