"""Submitting rendered stage scripts: `sbatch` each, chained with --dependency=afterok, and
the job ids recorded in <run dir>/slurm/jobs.json (what `grow status` reads)."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from orchestrator.atomic import read_json, write_json_atomic
from orchestrator.slurm.paths import jobs_file
from orchestrator.slurm.queue import query_jobs

LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING")


class SubmitError(RuntimeError):
    """Nothing (more) can be submitted; the message says why."""


def sbatch(script: Path, dependency: str | None) -> str:
    """Submit one script (after job `dependency` succeeds, if given); its job id."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    proc = subprocess.run(cmd + [str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch {script.name} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def check_can_submit(run_dir: Path) -> None:
    """sbatch exists, and none of the run's last submission is still queued or running
    (two chains on one run dir would race for its checkpoints)."""
    if not shutil.which("sbatch"):
        raise SubmitError("sbatch not found; is this a Slurm login node? "
                          "(submit.dry_run=true writes the scripts)")
    record = read_json(jobs_file(run_dir), {"submissions": []})
    if record["submissions"]:
        last = [s["job_id"] for s in record["submissions"][-1]["stages"]]
        queued = [j for j, q in query_jobs(last).items() if q["state"] in LIVE_STATES]
        if queued:
            raise SubmitError(f"jobs {', '.join(queued)} of {run_dir} are still queued or running; "
                              f"see `grow status run_dir={run_dir}` or scancel them first")


def submit_chain(run_dir: Path, scripts: list[tuple[int, str, Path]], on_submit=print) -> list[dict]:
    """sbatch (index, stage name, script) in order, each after the previous one; records
    every job submitted in jobs.json, also when a later sbatch fails."""
    record = read_json(jobs_file(run_dir), {"run_dir": str(run_dir), "submissions": []})
    submitted, prev = [], None
    try:
        for index, name, path in scripts:
            prev = sbatch(path, prev)
            submitted.append({"index": index, "name": name, "job_id": prev, "script": str(path)})
            on_submit(f"grow: stage {index} {name}: job {prev}"
                      + (f" (after {submitted[-2]['job_id']})" if len(submitted) > 1 else ""))
    finally:
        if submitted:
            record["submissions"].append({"time": time.time(), "stages": submitted})
            write_json_atomic(jobs_file(run_dir), record)
    return submitted
