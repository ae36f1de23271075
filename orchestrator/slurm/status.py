"""`grow status run_dir=DIR [format=json]`: each stage's Slurm jobs, state, requeue count,
tokens done and budget spent, from jobs.json, the job-side state files, the latest
checkpoint's ledger and `scontrol`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from orchestrator.atomic import read_json
from orchestrator.run.state import is_finished, latest_meta
from orchestrator.slurm.paths import jobs_file, stage_state_file
from orchestrator.slurm.queue import query_jobs

NEVER = ("DependencyNeverSatisfied",)


def _stage_list(run_dir: Path, record: dict) -> list[tuple[int, str, int | None]]:
    """(index, name, target tokens or None)."""
    cfg = read_json(run_dir / "config.json", None)
    if cfg:
        out = []
        for i, st in enumerate(cfg["schedule"]["stages"]):
            step = st["batch_size"] * st["seq_len"]
            out.append((i, st["name"], st["tokens"] // step * step))
        return out
    seen = {}
    for sub in record["submissions"]:
        for st in sub["stages"]:
            seen[st["index"]] = st["name"]
    return [(i, n, None) for i, n in sorted(seen.items())]


def describe(run_dir: Path) -> dict:
    record = read_json(jobs_file(run_dir), {"submissions": []})
    stages = _stage_list(run_dir, record)
    meta = latest_meta(run_dir) or {}
    ledger = meta.get("ledger", {})
    lost = ledger.get("_lost", {})
    jobs_of: dict[str, list[str]] = {}
    for sub in record["submissions"]:
        for st in sub["stages"]:
            jobs_of.setdefault(st["name"], []).append(st["job_id"])
    slurm = query_jobs([j for ids in jobs_of.values() for j in ids])
    rows, blocked_by = [], None
    for index, name, target in stages:
        ids = jobs_of.get(name, [])
        current = ids[-1] if ids else None
        q = slurm.get(current, {}) if current else {}
        state_file = read_json(stage_state_file(run_dir, name), {"attempts": [], "failures": 0})
        attempts = state_file["attempts"]
        requeues = max(q.get("restarts", 0), len(attempts) - len({a.get("job_id") for a in attempts}))
        finished = is_finished(meta or None, index)
        if finished:
            state = "FINISHED"
        elif q:
            state = q["state"]
            if q["state"] == "PENDING" and (q["reason"] in NEVER or blocked_by):
                state = ("PENDING, will not run (dependency never satisfied)" if q["reason"] in NEVER
                         else f"PENDING, will not run (waits on {blocked_by})")
            elif q["state"] == "PENDING" and q["reason"] not in ("None", ""):
                state = f"PENDING ({q['reason']})"
            if q["state"] in ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                              "DEADLINE", "PREEMPTED") or "will not run" in state:
                blocked_by = blocked_by or f"stage {name}, {q['state'].lower()}"
        elif current:
            last = attempts[-1].get("outcome") if attempts else None
            state = f"job {current} no longer known to Slurm" + (f"; last attempt: {last}" if last else "")
        else:
            state = "not submitted"
        spend = ledger.get(name, {})
        rows.append({"index": index, "stage": name, "job_ids": ids, "state": state,
                     "slurm_state": q.get("state"), "reason": q.get("reason"), "requeues": requeues,
                     "consecutive_failures": state_file["failures"],
                     "tokens": int(spend.get("tokens", 0)), "tokens_target": target,
                     "gpu_hours": spend.get("gpu_hours", 0.0), "cost_usd": spend.get("cost_usd", 0.0),
                     "lost_s": lost.get(name, {}).get("lost_s", 0.0), "finished": finished})
    running = [r["stage"] for r in rows if r["slurm_state"] in ("RUNNING", "COMPLETING")]
    total_usd = sum(r["cost_usd"] for r in rows)
    return {"run_dir": str(run_dir), "stages": rows, "running": running,
            "summary": read_json(run_dir / "summary.json", {}).get("status"),
            "spent_usd": total_usd}


def status_command(args: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = [a for a in args if "=" not in a] + [k for k in opts if k not in ("run_dir", "format")]
    if unknown or "run_dir" not in opts:
        print("grow: usage: grow status run_dir=DIR [format=table|json]", file=sys.stderr)
        return 2
    run_dir = Path(opts["run_dir"]).expanduser().resolve()
    if not run_dir.is_dir():
        print(f"grow: {run_dir} is not a directory", file=sys.stderr)
        return 2
    info = describe(run_dir)
    if opts.get("format", "table") == "json":
        print(json.dumps(info, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{run_dir}")
    for col in ("#", "stage", "jobs", "state", "requeues", "tokens", "GPU-h", "USD", "lost s"):
        table.add_column(col)
    for r in info["stages"]:
        tokens = f"{r['tokens']}" + (f"/{r['tokens_target']}" if r["tokens_target"] else "")
        table.add_row(str(r["index"]), r["stage"], ",".join(r["job_ids"]) or "-", r["state"],
                      str(r["requeues"]), tokens, f"{r['gpu_hours']:.4f}", f"{r['cost_usd']:.4f}",
                      f"{r['lost_s']:.0f}")
    console = Console(width=160)
    console.print(table)
    console.print(f"running now: {', '.join(info['running']) or 'nothing'}; "
                  f"spent ${info['spent_usd']:.4f}; summary: {info['summary'] or 'none yet'}")
    return 0
