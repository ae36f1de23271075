"""Sweep members checked first and labelled right (`grow search`, `grow predict`, `grow run -m`):
every member of a space is checked before the first one trains (a nan, a swept key that has
no effect, a width that makes a model no run would accept, a rerun with other values), the
sweep directory is locked before anything is written into it, and each member is reported
with the values its own run pinned (config.json), a partial sweep's winner as such."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from omegaconf import OmegaConf

from orchestrator.commands.compose import CommandLine, load
from orchestrator.commands.members import holding
from orchestrator.commands.predict import SHAPE_KEY, points_of
from orchestrator.config.errors import ConfigError
from orchestrator.run import lock as run_lock
from orchestrator.run.lock import HELD_BY_PARENT, RunLock
from orchestrator.run.sweep import collect

from ..conftest import grow_in_process
from ..forked_grow import start_grow
from .test_search import PROXY, proxy_args

LR = "schedule.stages.0.lr.peak"


def trained_lr(member_dir) -> float:
    return json.loads((member_dir / "config.json").read_text())["schedule"]["stages"][0]["lr"]["peak"]


def launched_lr(member_dir) -> str:
    overrides = OmegaConf.load(member_dir / ".hydra" / "overrides.yaml")
    return next(o.partition("=")[2] for o in overrides if o.startswith(LR + "="))


def other_process_locks(directory) -> None:
    """RunLock(directory) taken and released by another process (a forked child that, like a
    fresh one, holds nothing): ConfigError if the directory is held."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.environ.pop(HELD_BY_PARENT, None)
        run_lock._held.clear()
        try:
            with RunLock(directory):
                message = b""
        except ConfigError as e:
            message = str(e).encode()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    message = os.read(read, 4096).decode()
    os.waitpid(pid, 0)
    if message:
        raise ConfigError("run_dir", message)


def checkpoints_under(directory) -> list:
    return list(directory.rglob("checkpoints")) if directory.exists() else []


# -- refused before any member trains (in-process) --------------------------------------

@pytest.mark.parametrize("command,args,line", [
    (["search"], [f"{LR}=1e-3,nan"],
     f"grow: config error: {LR}: must be a finite number, got nan (sweep member 1 of 2: {LR}=nan)"),
    (["search", "search.space=flm"], [],
     "grow: config error: model.mup.output_mult: swept, but it has no effect with model.parametrization=standard "
     "(muP's settings apply only with model.parametrization=mup) (sweep member 0 of 27: "),
    (["search"], ["schedule.stages.0.lr.decay_fraction=0.1,0.3"],
     "grow: config error: schedule.stages.0.lr.decay_fraction: swept, but it has no effect with "
     "schedule.stages.0.lr.decay=cosine"),
    (["run", "-m"], ["model.position=alibi", "model.rope_theta=1e4,5e5"],
     "grow: config error: model.rope_theta: swept, but it has no effect with model.position=alibi "
     "(RoPE's base applies only with model.position=rope) (sweep member 0 of 2: model.rope_theta=10000.0)"),
    (["search"], [f"{LR}=1e-3,0.001"],  # Hydra reads both as 0.001
     f"grow: config error: sweep: members 0 and 1 are the same run ({LR}=0.001 and {LR}=0.001); give each value once"),
    (["run", "-m"], [f"{LR}=1e-3,nan"],
     f"grow: config error: {LR}: must be a finite number, got nan (sweep member 1 of 2: {LR}=nan)"),
])
def test_a_bad_member_is_refused_before_any_member_trains(tmp_path, data_cache, capsys, command, args, line):
    sweep = tmp_path / "sweep"
    code = grow_in_process(*command, *proxy_args(tmp_path, data_cache), *args, f"hydra.sweep.dir={sweep}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(line), err
    assert not sweep.exists() and not checkpoints_under(tmp_path)  # nothing written, nothing trained


def test_predict_refuses_a_width_no_run_would_accept_before_any_proxy_trains(tmp_path, data_cache, capsys):
    # a multiple of the head size, but a model no process here can hold: found by the run's own checks
    sweep = tmp_path / "p"
    code = grow_in_process("predict", "predict.widths=32,64,65536", *proxy_args(tmp_path, data_cache),
                           f"hydra.sweep.dir={sweep}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("grow: config error: schedule.stages.0.layout: one step needs at least ")
    assert err[0].endswith("(sweep member 2 of 3: schedule.stages.0.shape={layers:2,hidden:65536,ffn:262144,"
                           "heads:4096,kv_heads:4096})")
    assert not sweep.exists() and not checkpoints_under(tmp_path)


# -- one finished search, then what is done with its directory ---------------------------

@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, data_cache):
    """A search of two learning rates, run to its end: (sweep dir, its search.json)."""
    tmp = tmp_path_factory.mktemp("search")
    sweep = tmp / "sweep"
    assert grow_in_process("search", f"{LR}=1e-3,1e-2", *proxy_args(tmp, data_cache), f"hydra.sweep.dir={sweep}") == 0
    return sweep, json.loads((sweep / "search.json").read_text())


@pytest.mark.slow
def test_search_json_reports_what_each_member_trained(finished_search):
    sweep, report = finished_search
    assert [m["swept"][LR] for m in report["members"]] == ["0.001", "0.01"]
    for m in report["members"]:
        assert float(m["swept"][LR]) == trained_lr(sweep / str(m["member"]))
        assert m["swept_from"] == "config.json"
    winner = report["winner"]
    assert report["apply"] == [f"{LR}={trained_lr(sweep / str(winner['member']))}"]
    assert report["partial"] is False and report["planned"] == 2


@pytest.mark.slow
def test_a_member_is_labelled_by_its_config_json_not_its_launch_arguments(finished_search, tmp_path):
    """A member whose .hydra/ says one value while its run trained another (what a refused
    second sweep used to leave) is reported with the value it trained: in sweep_summary.json
    (collect) and so in search.json."""
    sweep, _ = finished_search
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    overrides = copy / "0" / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace(f"{LR}=0.001", f"{LR}=0.002"))
    assert launched_lr(copy / "0") == "0.002"
    members = collect(copy)["members"]
    assert members[0]["swept"] == {LR: "0.001"} and members[1]["swept"] == {LR: "0.01"}
    # grow predict's points: the width a proxy trained (hidden=32 here), whatever its .hydra/ says
    overrides.write_text(overrides.read_text() + f"- {SHAPE_KEY}={{layers:2,hidden:64,ffn:256,heads:4,kv_heads:4}}\n")
    cfg = load(CommandLine(PROXY))
    assert [p["width"] for p in points_of(cfg, members)] == [32, 32]


def test_a_sweep_holds_its_directory_and_each_members_and_ranks_see_the_innermost(tmp_path, monkeypatch):
    """The ranks a member launches (torchrun children) find their run directory in
    GROW_RUN_LOCK_HELD: the member's while it runs, the sweep's again after it."""
    monkeypatch.delenv(HELD_BY_PARENT, raising=False)
    sweep = tmp_path / "sweep"
    with holding(sweep, 2, [LR + "=1e-3,1e-2"]):
        assert sorted(p.name for p in sweep.iterdir()) == [".lock", "0", "1"]
        with RunLock(sweep / "0"):  # the member, in this process: already held, named for its ranks
            assert os.environ[HELD_BY_PARENT] == str((sweep / "0" / ".lock").resolve())
        assert os.environ[HELD_BY_PARENT] == str((sweep / "1" / ".lock").resolve())
        with pytest.raises(ConfigError, match="in use by another grow run"):  # another process is refused
            other_process_locks(sweep / "0")
    assert HELD_BY_PARENT not in os.environ
    other_process_locks(sweep)  # released


def files_of(sweep) -> dict:
    """Every file of a sweep but its locks (a lock file holds its holder's pid)."""
    return {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_a_rerun_with_other_values_is_refused_before_it_writes(finished_search, data_cache, capsys):
    sweep, report = finished_search
    before = files_of(sweep)
    code = grow_in_process("search", f"{LR}=1e-2,1e-3", *proxy_args(sweep.parent, data_cache),
                           f"hydra.sweep.dir={sweep}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"grow: config error: {LR}: differs from the run already in {sweep / '0'} (0.001 -> 0.01); "
                      f"resume with the same settings or use another hydra.run.dir (sweep member 0 of 2: {LR}=0.01)")
    assert files_of(sweep) == before


@pytest.mark.slow
def test_a_rerun_reuses_finished_members_and_reports_their_own_values(finished_search, data_cache, capsys):
    sweep, report = finished_search
    assert grow_in_process("search", f"{LR}=1e-3,1e-2", *proxy_args(sweep.parent, data_cache),
                           f"hydra.sweep.dir={sweep}") == 0
    assert " ".join(capsys.readouterr().out.split()).count("already finished; nothing to do") == 2
    again = json.loads((sweep / "search.json").read_text())
    assert [m["swept"] for m in again["members"]] == [m["swept"] for m in report["members"]]
    assert again["winner"]["member"] == report["winner"]["member"] and again["apply"] == report["apply"]


# -- two searches into one directory -----------------------------------------------------

@pytest.mark.slow
def test_a_second_search_into_a_busy_sweep_dir_is_refused_before_it_writes(tmp_path, data_cache, capsys):
    sweep = tmp_path / "sweep"
    first_args = ["search", f"{LR}=1e-3,3e-3,1e-2", *proxy_args(tmp_path, data_cache),
                  "schedule.stages.0.tokens=8192", f"hydra.sweep.dir={sweep}"]
    first = start_grow(first_args, tmp_path, {**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path / "logs")
    try:
        deadline = time.monotonic() + 300
        while not (sweep / "0" / ".hydra" / "overrides.yaml").exists():  # its first member trains
            assert first.poll() is None and time.monotonic() < deadline, first.stderr
            time.sleep(0.2)
        written = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and ".hydra" in p.parts
                   or p.name in ("multirun.yaml", "swept_keys.json")}
        code = grow_in_process("search", f"{LR}=2e-3,4e-3", *proxy_args(tmp_path, data_cache),
                               "schedule.stages.0.tokens=8192", f"hydra.sweep.dir={sweep}")
        err = capsys.readouterr().err.strip().splitlines()
        assert first.poll() is None, "the first search ended before the second tried: no concurrency tested"
        assert code == 2 and err == [f"grow: config error: hydra.sweep.dir: {sweep} is in use by another grow run "
                                     f"(pid {first.pid}); wait for it or pick another hydra.sweep.dir"], err
        for path, content in written.items():
            assert path.read_bytes() == content
        assert first.wait(600) == 0, first.stderr[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    report = json.loads((sweep / "search.json").read_text())
    assert [m["swept"][LR] for m in report["members"]] == ["0.001", "0.003", "0.01"]
    for m in report["members"]:  # .hydra/, config.json and the report agree
        member = sweep / str(m["member"])
        assert float(m["swept"][LR]) == trained_lr(member) == float(launched_lr(member))
    assert not any(v in (sweep / "multirun.yaml").read_text() for v in ("2e-3", "4e-3"))


# -- a partial sweep ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_winner_of_a_partial_sweep_says_so(tmp_path, data_cache, capsys):
    # member 0's token cap stops it before its stage ends; member 1 finishes
    sweep = tmp_path / "sweep"
    code = grow_in_process("search", "budget.max_tokens=1024,1000000", *proxy_args(tmp_path, data_cache),
                           f"hydra.sweep.dir={sweep}")
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((sweep / "search.json").read_text())
    assert report["partial"] is True and report["finished"] == [1] and report["winner"]["member"] == 1
    assert "winner (best of 1 of 2 members, a partial sweep): member 1" in out
    assert "warning: a partial sweep: 1 of 2 members finished" in " ".join(out.split())
