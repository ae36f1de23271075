"""A submitted run's state for `grow status`: each stage's Slurm jobs, state, requeue count,
tokens done and budget spent, from jobs.json, the job-side state files, the latest
checkpoint's ledger and `scontrol`."""
from __future__ import annotations

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


def _reason(attempt: dict) -> str | None:
    """Why an attempt ended without finishing its stage: node failure (Slurm requeued the
    job itself), time limit or preemption (a signal, then our requeue), or a crash."""
    outcome = attempt.get("outcome", "")
    if outcome.startswith("interrupted"):
        return "node failure or preemption"
    if outcome == "requeue":
        return "time limit or preemption signal"
    if outcome.startswith(("failure", "gave up")):
        return f"crash (exit {attempt.get('rc')})"
    return None


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
                     "nodes": attempts[-1].get("nodes", 1) if attempts else None,
                     "requeue_reasons": [_reason(a) for a in attempts[:-1] if _reason(a)],
                     "consecutive_failures": state_file["failures"],
                     "tokens": int(spend.get("tokens", 0)), "tokens_target": target,
                     "gpu_hours": spend.get("gpu_hours", 0.0), "cost_usd": spend.get("cost_usd", 0.0),
                     "lost_s": lost.get(name, {}).get("lost_s", 0.0), "finished": finished})
    running = [r["stage"] for r in rows if r["slurm_state"] in ("RUNNING", "COMPLETING")]
    total_usd = sum(r["cost_usd"] for r in rows)
    return {"run_dir": str(run_dir), "stages": rows, "running": running,
            "summary": read_json(run_dir / "summary.json", {}).get("status"),
            "spent_usd": total_usd}
