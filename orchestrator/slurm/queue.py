"""What Slurm knows about a job, from `scontrol show job` (no slurmdbd/sacct needed;
a finished job stays visible for the cluster's MinJobAge)."""
from __future__ import annotations

import re
import shutil
import subprocess

FIELDS = ("JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "ExitCode", "Dependency", "NodeList")


def parse_scontrol(line: str) -> dict:
    out = {}
    for m in re.finditer(r"(\w+)=(\S*)", line):
        out.setdefault(m.group(1), m.group(2))
    return out


def query_jobs(job_ids: list[str]) -> dict[str, dict]:
    """job id -> {state, reason, restarts, run_time, exit_code, dependency}; ids Slurm no
    longer knows are left out."""
    if not job_ids or not shutil.which("scontrol"):
        return {}
    found = {}
    for job in job_ids:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True)
        if proc.returncode != 0 or not proc.stdout.strip():
            continue
        f = parse_scontrol(proc.stdout.splitlines()[0])
        found[str(job)] = {"state": f.get("JobState", "?"), "reason": f.get("Reason", ""),
                           "restarts": int(f.get("Restarts", "0") or 0), "run_time": f.get("RunTime", ""),
                           "time_limit": f.get("TimeLimit", ""), "exit_code": f.get("ExitCode", ""),
                           "dependency": f.get("Dependency", "")}
    return found


def partition_nodes(partition: str | None) -> tuple[str, int] | None:
    """(partition name, its node count) from `sinfo`: the named partition, or the default
    one; None where sinfo is missing or does not know it."""
    if not shutil.which("sinfo"):
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True)
    counts: dict[str, int] = {}
    default = None
    for line in proc.stdout.splitlines():
        name, _, count = line.partition(" ")
        if name.endswith("*"):
            name = default = name[:-1]
        if count.strip().isdigit():
            counts[name] = counts.get(name, 0) + int(count)  # one line per node state
    name = partition or default
    return (name, counts[name]) if name in counts else None
