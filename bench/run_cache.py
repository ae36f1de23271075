"""Finished `grow run`s kept in a work directory, keyed by their overrides, so that a
benchmark called again reuses them (bench/growth_vs_scratch.py).

The package has no such cache: `grow run` into a finished run's directory only reports it
finished, but one stopped part-way would resume, and its wall-clock curve would then span
the gap. Here a run that did not complete starts over in an empty directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, console

CONDITIONS = "bench_run.json"  # in each run directory: the load it ended at and the runs beside it


def run_dir_of(name: str, overrides: list[str], work: Path) -> Path:
    """Where the run of `overrides` lives in `work`: <name>-<hash of the overrides>."""
    return Path(work) / f"{name}-{hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:10]}"


def cached_run(name: str, overrides: list[str], work: Path, jobs: int) -> Path:
    """The directory of a complete `grow run overrides`: reused when `work` holds one, else
    run afresh (its log beside it); `jobs`, the runs sharing the machine, is recorded with it."""
    run_dir = run_dir_of(name, overrides, work)
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text())["status"] == "complete":
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    run_dir.with_name(run_dir.name + ".overrides.json").write_text(json.dumps(overrides, indent=1))
    log_path = run_dir.with_name(run_dir.name + ".log")
    cmd = [str(Path(sys.executable).parent / "grow"), "run", *overrides, f"hydra.run.dir={run_dir}"]
    t = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{name}: grow run failed (rc {rc}); see {log_path}")
    # the conditions it ran under travel with the cached run (a later call may reuse it)
    (run_dir / CONDITIONS).write_text(json.dumps({"loadavg_1_5_15_end": os.getloadavg(), "jobs": jobs}))
    console.print(f"{name}: {run_dir.name} done in {time.time() - t:.0f} s")
    return run_dir
