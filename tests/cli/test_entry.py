"""The entry layer: one map from error kind to exit status, user config directories
(`--config-dir`, `hydra.searchpath`) for run/plan/submit, a broken YAML file as one line
naming the file and line, and a config validated once per `grow run`."""
from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import exits
from orchestrator.checkpoint.canonical import CheckpointError
from orchestrator.cli import main
from orchestrator.config.errors import ConfigError
from orchestrator.data import DataError
from orchestrator.package_data import CONF_DIR
from orchestrator.run.transition import GrowthCheckError
from orchestrator.run.stage_loop import StopRequested


# Two stages of 4 steps each (a width growth between them): seconds on one thread.
MINE = """\
name: mine
stages:
  - name: small
    shape: {layers: 1, hidden: 32, ffn: 64, heads: 2, kv_heads: 1}
    tokens: 1024
    batch_size: 4
    seq_len: 64
    lr: {peak: 3.0e-3, warmup_steps: 1, min: 1.0e-3, decay: cosine}
    growth: null
  - name: wide
    shape: {layers: 1, hidden: 64, ffn: 128, heads: 4, kv_heads: 2}
    tokens: 1024
    batch_size: 4
    seq_len: 64
    lr: {peak: null, warmup_steps: 1, min: 5.0e-4, decay: cosine}
    growth: {ramp_steps: 2}
"""

ONE = MINE[:MINE.index("  - name: wide")].replace("name: mine", "name: one")

# file text -> (line the error is on, words of the message)
BROKEN_YAML = {
    "syntax": ("name: bad\nstages: [\n  - name: s1\n", 3, "expected the node content"),
    "tab": ("name: tab\nstages:\n\t- name: s1\n", 3, "spaces, not tabs"),
    "duplicate": ("name: dup\nstages: []\nname: again\n", 3, "duplicate key name"),
    "nested_duplicate": (MINE.replace("    batch_size: 4\n", "    batch_size: 4\n    batch_size: 8\n", 1),
                         7, "duplicate key batch_size"),
}


@pytest.fixture
def config_dir(tmp_path) -> Path:
    d = tmp_path / "myconf"
    (d / "schedule").mkdir(parents=True)
    (d / "schedule" / "mine.yaml").write_text(MINE)
    (d / "schedule" / "one.yaml").write_text(ONE)
    for name, (text, _, _) in BROKEN_YAML.items():
        (d / "schedule" / f"{name}.yaml").write_text(text)
    return d


@pytest.fixture
def restore_process_state():
    """`grow run` sets the umask and early signal handlers for its process: undo them here."""
    umask = os.umask(0o022)
    os.umask(umask)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    os.umask(umask)
    for s, h in handlers.items():
        signal.signal(s, h)


# -- exit statuses ----------------------------------------------------------------------

def test_every_named_error_kind_exists():
    for name in [*exits.ERROR_KINDS, exits.STOP_REQUESTED]:
        module, _, cls = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), cls), type), name


@pytest.mark.parametrize("error,status,line", [
    (ConfigError("schedule.name", "bad"), 2, "grow: config error: schedule.name: bad"),
    (DataError("data.sources.x: empty"), 2, "grow: config error: data.sources.x: empty"),
    (GrowthCheckError("growth into s2 changed the loss"), 3, "grow: growth into s2 changed the loss"),
    (CheckpointError("manifest mismatch"), 1, "grow: checkpoint error: manifest mismatch"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"), 1,
     "grow: disk full: No space left on device writing /x/model.safetensors; checkpoints already "
     "written are intact - free space and run again"),
])
def test_each_error_kind_is_one_line_and_its_status(error, status, line, capsys):
    assert exits.exit_status(error) == status
    assert capsys.readouterr().err.strip() == line


def test_a_stop_is_128_plus_the_signal_and_silent(capsys):
    assert exits.exit_status(StopRequested(signal.SIGUSR1, "ckpt")) == 128 + signal.SIGUSR1
    assert capsys.readouterr().err == ""


def test_unknown_errors_are_not_swallowed(capsys):
    assert exits.exit_status(RuntimeError("a bug")) is None
    assert exits.exit_status(OSError(errno.EACCES, "Permission denied")) is None
    assert capsys.readouterr().err == ""


# -- user config directories --------------------------------------------------------------

def test_plan_reads_a_schedule_from_the_users_config_dir(config_dir, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--config-dir", str(config_dir), "schedule=mine", f"hydra.run.dir={out}"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["schedule"] == "mine" and [s["name"] for s in plan["stages"]] == ["small", "wide"]
    # the same through hydra.searchpath; the shipped groups stay available beside it
    out2 = tmp_path / "plan2"
    assert main(["plan", f"hydra.searchpath=[file://{config_dir}]", "schedule=mine", "model=gpt_tiny",
                 f"hydra.run.dir={out2}"]) == 0
    plan2 = json.loads((out2 / "plan.json").read_text())
    assert [s["name"] for s in plan2["stages"]] == ["small", "wide"]
    assert plan2["stages"][0]["params"] != plan["stages"][0]["params"]  # gpt_tiny: an untied head


def test_submit_passes_the_config_dir_to_every_job(config_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["submit", "-cd", "myconf", "schedule=mine", f"hydra.run.dir={run_dir}",
                 "submit.dry_run=true"]) == 0
    scripts = sorted((run_dir / "slurm").glob("*.sbatch"))
    assert [p.name for p in scripts] == ["0-small.sbatch", "1-wide.sbatch"]
    for p in scripts:  # absolute, so the job finds it whatever its working directory
        assert f"hydra.searchpath=[file://{config_dir.resolve()}]" in p.read_text()


def test_a_missing_config_dir_is_one_line(tmp_path, capsys):
    assert main(["plan", "--config-dir", str(tmp_path / "nope"), "schedule=mine"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"grow: config error: --config-dir: {tmp_path / 'nope'} is not a directory"


@pytest.mark.parametrize("args", [["--config-dir"], ["--cfg", "everything"], ["--no-such-flag"],
                                  ["--config-name", "mine"]])
def test_bad_flags_are_one_line(args, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("grow: config error: arguments: "), err


# -- broken YAML files ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "plan", "submit"])
@pytest.mark.parametrize("name", list(BROKEN_YAML))
def test_broken_yaml_is_one_line_naming_file_and_line(command, name, config_dir, tmp_path, capsys,
                                                     restore_process_state):
    _, line, words = BROKEN_YAML[name]
    run_dir = tmp_path / "out"
    extra = ["submit.dry_run=true"] if command == "submit" else []
    assert main([command, "--config-dir", str(config_dir), f"schedule={name}",
                 f"hydra.run.dir={run_dir}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err], err
    assert err.startswith(f"grow: config error: {config_dir / 'schedule' / name}.yaml, line {line}: "), err
    assert words in err, err
    assert not run_dir.exists()  # refused before anything was written


@pytest.mark.parametrize("command", ["run", "plan", "submit"])
def test_a_config_file_that_is_not_text_is_named(command, tmp_path, capsys, restore_process_state):
    bad = tmp_path / "conf" / "model" / "binary.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"hidden: 64\n# \xff\xfe\n")
    assert main([command, "--config-dir", str(tmp_path / "conf"), "model=binary"]) == 2
    assert capsys.readouterr().err.strip() == (f"grow: config error: {bad}: not UTF-8 text "
                                               "(invalid start byte at byte 13)")


def test_broken_yaml_through_hydra_searchpath(config_dir, capsys, restore_process_state):
    assert main(["run", f"hydra.searchpath=[file://{config_dir}]", "schedule=tab"]) == 2
    assert f"{config_dir / 'schedule' / 'tab.yaml'}, line 3" in capsys.readouterr().err


def test_broken_yaml_in_a_sweep_is_one_line_before_it_starts(config_dir, tmp_path, capsys,
                                                             restore_process_state):
    sweep_dir = tmp_path / "sweep"
    assert main(["run", "-m", "--config-dir", str(config_dir), "schedule=tab", "seed=1,2",
                 f"hydra.sweep.dir={sweep_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"{config_dir / 'schedule' / 'tab.yaml'}, line 3" in err, err
    assert not sweep_dir.exists()


def test_the_grow_binary_reports_broken_yaml_in_one_line(config_dir, tmp_path):
    """The installed console script, from an unrelated directory."""
    grow = Path(sys.executable).with_name("grow")
    proc = subprocess.run([str(grow), "run", "--config-dir", str(config_dir), "schedule=duplicate"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"grow: config error: {config_dir / 'schedule' / 'duplicate.yaml'}, "
                                   "line 3: found duplicate key name")
    assert proc.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["myconf"]


# -- validated once -----------------------------------------------------------------------

COUNT_VALIDATIONS = """
import sys
import orchestrator.commands.configure as v
real, calls = v.check_config, []
def counting(*a, **k):
    calls.append(1)
    return real(*a, **k)
v.check_config = counting
from orchestrator.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("VALIDATIONS", len(calls), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
def test_grow_run_validates_once_and_each_sweep_member_once(config_dir, tmp_path, data_cache):
    common = ["--config-dir", str(config_dir), "tracking=off", "engine.threads=1",
              f"data.cache_dir={data_cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def grow(*overrides, flags=()):  # Hydra's flags (-m) go before the overrides
        proc = subprocess.run([sys.executable, "-c", COUNT_VALIDATIONS, "run", *flags, *common, *overrides],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return int(proc.stderr.rsplit("VALIDATIONS", 1)[1].split()[0])

    assert grow("schedule=mine", f"hydra.run.dir={tmp_path / 'one'}") == 1
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["small", "wide"]
    hydra_cfg = (tmp_path / "one" / ".hydra" / "hydra.yaml").read_text()
    assert f"path: {CONF_DIR}" in hydra_cfg and f"path: {config_dir}" in hydra_cfg
    assert grow("schedule=one", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", flags=["-m"]) == 2
    report = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert [m["status"] for m in report["members"]] == ["complete", "complete"]
