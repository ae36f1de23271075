"""Bad input an independent probe tried (issue 12), and its siblings: every one is refused by
validation with one line naming the key and exit status 2, before anything is written."""
from __future__ import annotations

import dataclasses
import os
import typing

import pytest
import torch

from orchestrator.commands.run_job import precheck
from orchestrator.config.schema import RunConfig
from orchestrator.commands.configure import load_config
from orchestrator.config.errors import ConfigError

from .conftest import _base, refused

# -- every numeric key of the schema, in-process on a composed config -----------------------

BASE = _base()


def _unwrap(tp):
    while typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def numeric_keys(tp=RunConfig, prefix="") -> list[tuple[str, type]]:
    """(dotted key, float|int) of every numeric leaf: stages as stage 1 (which has a growth),
    lists and dicts of numbers through one entry."""
    out = []
    for f in dataclasses.fields(tp):
        t, key = _unwrap(typing.get_type_hints(tp)[f.name]), f"{prefix}{f.name}"
        origin = typing.get_origin(t)
        if dataclasses.is_dataclass(t):
            out += numeric_keys(t, key + ".")
        elif origin is list and dataclasses.is_dataclass(typing.get_args(t)[0]):
            out += numeric_keys(typing.get_args(t)[0], key + ".1.")
        elif origin in (list, dict) and typing.get_args(t)[-1] in (int, float):
            entry = {"budget.warn_at": "0", "cluster.achieved_tflops_per_gpu": "s1"}.get(key, "stdlib")
            out.append((f"{key}.{entry}", typing.get_args(t)[-1]))
        elif t in (int, float):
            out.append((key, t))
    return out


NUMERIC = numeric_keys()
FLOATS = [k for k, t in NUMERIC if t is float]
INTS = [k for k, t in NUMERIC if t is int]


def _with(key: str, value) -> dict:
    import copy
    cfg = copy.deepcopy(BASE)
    node, parts = cfg, key.split(".")
    for p in parts[:-1]:
        nxt = node[int(p)] if isinstance(node, list) else node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        node = nxt
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return cfg


def test_the_sweep_covers_the_schema():
    assert len(FLOATS) >= 25 and len(INTS) >= 35
    for key in ("schedule.stages.1.lr.peak", "schedule.stages.1.growth.tolerance", "train.eps",
                "budget.max_usd", "budget.max_flops", "tracking.flush_every_s", "model.rope_theta",
                "cluster.achieved_tflops_per_gpu.s1", "budget.warn_at.0", "schedule.stages.1.mixture.stdlib"):
        assert key in FLOATS, key
    for key in ("seed", "schedule.stages.1.seq_len", "budget.max_tokens", "submit.rdzv_port"):
        assert key in INTS, key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOATS)
def test_every_float_must_be_finite_and_the_error_names_it(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(_with(key, value))
    assert e.value.key == key and "finite" in str(e.value)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, float("nan")], ids=["2^64", "-2^63-1", "nan"])
@pytest.mark.parametrize("key", INTS)
def test_every_int_must_fit_64_bits_and_the_error_names_it(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(_with(key, value))
    assert e.value.key == key


@pytest.mark.parametrize("key, value, words", [
    ("seed", 2**32, "[0, 4294967295]"),
    ("seed", -1, "[0, 4294967295]"),
    ("submit.rdzv_port", 70000, "not a TCP port"),
    ("data.tokenizer.train_chars", 0, "> 0"),
    ("model.vocab_size", 256, "below the tokenizer's 257"),
])
def test_ranges_beyond_64_bits(key, value, words):
    with pytest.raises(ConfigError) as e:
        load_config(_with(key, value))
    assert e.value.key == key and words in str(e.value)


def test_bpe_vocabulary_is_an_upper_bound_checked_at_validation():
    cfg = _with("data.tokenizer.kind", "bpe")
    cfg["data"]["tokenizer"]["vocab_size"] = 1000
    cfg["model"]["vocab_size"] = 512
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.key == "model.vocab_size" and "below the tokenizer's 1000" in str(e.value)
    cfg["model"]["vocab_size"] = 1024
    assert load_config(cfg).model.vocab_size == 1024


# -- the CLI's precheck: one line, exit 2, the run directory never created ------------------


def _corpus(tmp_path, case: str):
    d = tmp_path / "corpus"
    d.mkdir()
    args = []
    if case == "empty_dir":
        pass
    elif case == "binary":
        (d / "ok.txt").write_text("hello " * 100)
        (d / "model.bin").write_bytes(bytes(range(256)) * 8)
    elif case == "not_utf8":
        (d / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    elif case == "jsonl_without_text":
        (d / "a.jsonl").write_text('{"body": "no text key"}\n')
    elif case == "jsonl_not_json":
        (d / "a.jsonl").write_text('{"text": "cut\n')
    elif case == "jsonl_text_not_a_string":
        (d / "a.jsonl").write_text('{"text": 42}\n')
    elif case == "glob_matches_nothing":
        (d / "a.txt").write_text("hello")
        args.append("data.sources.mine.glob=*.md")
    elif case == "fifo":
        os.mkfifo(d / "pipe.txt")
    elif case == "fifo_beside_text":
        (d / "a.txt").write_text("hello")
        os.mkfifo(d / "b.txt")
    elif case == "fifo_as_path":
        os.mkfifo(tmp_path / "pipe")
        return [f"data.sources.mine.paths=[{tmp_path / 'pipe'}]"]
    elif case == "missing_path":
        return [f"data.sources.mine.paths=[{tmp_path / 'nope'}]"]
    return [f"data.sources.mine.paths=[{d}]", *args]


DATA_CASES = {
    "empty_dir": "no files match", "binary": "NUL byte", "not_utf8": "not valid UTF-8 at byte 3",
    "jsonl_without_text": "no key 'text'", "jsonl_not_json": "not valid JSON",
    "jsonl_text_not_a_string": "not a string", "glob_matches_nothing": "no files match glob '*.md'",
    "fifo": "is a FIFO", "fifo_beside_text": "is a FIFO", "fifo_as_path": "is a FIFO",
    "missing_path": "does not exist",
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_errors_are_found_before_the_run_directory_exists(case, tmp_path, capsys):
    err = refused(capsys, tmp_path, "data=files", f"data.cache_dir={tmp_path / 'cache'}", *_corpus(tmp_path, case))
    assert "data.sources.mine.paths.0" in err and DATA_CASES[case] in err, err
    assert not (tmp_path / "cache").exists()


def test_a_good_corpus_passes(tmp_path, capsys):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("caf\u00e9 " * 30000)  # a 2-byte character across the 64 KiB head
    (d / "b.jsonl").write_text('{"text": "x"}\n' + '{"body": "later records are the tokenizer\'s"}\n')
    assert isinstance(precheck(["schedule=tiny", f"hydra.run.dir={tmp_path / 'run'}", "data=files",
                                f"data.sources.mine.paths=[{d}]"]), RunConfig)


@pytest.mark.parametrize("what", ["run_dir_under_file", "run_dir_is_file", "cache_under_file",
                                  "sqlite_dir_missing", "sqlite_is_dir", "file_store_under_file"])
def test_paths_that_cannot_work(what, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    overrides, key = {
        "run_dir_under_file": ([f"hydra.run.dir={blocker}/run"], "hydra.run.dir"),
        "run_dir_is_file": ([f"hydra.run.dir={blocker}"], "hydra.run.dir"),
        "cache_under_file": ([f"data.cache_dir={blocker}/cache"], "data.cache_dir"),
        "sqlite_dir_missing": ([f"tracking.uri=sqlite:///{tmp_path}/nodir/mlflow.db"], "tracking.uri"),
        "sqlite_is_dir": ([f"tracking.uri=sqlite:///{tmp_path}"], "tracking.uri"),
        "file_store_under_file": ([f"tracking.uri=file://{blocker}/store"], "tracking.uri"),
    }[what]
    err = refused(capsys, tmp_path, *overrides)
    assert f"config error: {key}:" in err, err


def test_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, without its GPU
    err = refused(capsys, tmp_path, "engine.device=cuda")
    assert "engine.device: cuda, but no CUDA device" in err


@pytest.mark.parametrize("overrides, key", [
    # a context far beyond what the machine holds (the probe's case): activations
    (["schedule.stages.0.seq_len=1000000", "schedule.stages.0.tokens=8000000",
      "schedule.stages.0.lr.warmup_steps=0"], "schedule.stages.0.seq_len"),
    # a model whose weights and Adam moments alone do not fit
    (["schedule.stages.2.shape.hidden=65536", "schedule.stages.2.shape.ffn=262144",
      "schedule.stages.2.shape.heads=4096", "schedule.stages.2.shape.kv_heads=2048"], "schedule.stages.2.layout"),
])
def test_memory_per_step_above_the_machine_is_refused(overrides, key, tmp_path, capsys):
    err = refused(capsys, tmp_path, "engine.device=cpu", *overrides)
    assert f"config error: {key}: one step needs at least" in err and "this machine's RAM" in err, err


def test_planner_counts_activations_against_gpu_memory():
    from orchestrator.budget.planner import make_plan
    from orchestrator.commands.plan import compose_config

    flm = ["schedule=flm101b", "cluster=a800_192"]
    assert make_plan(compose_config(flm)).stages[0].name == "s16b"  # bf16, micro-batch 4: fits 80 GB
    with pytest.raises(ConfigError) as e:  # the model states fit, 24 sequences' activations do not
        make_plan(compose_config([*flm, "schedule.stages.0.layout.micro_batch_size=24"]))
    assert e.value.key == "schedule.stages.0.seq_len" and "activations" in str(e.value)
