"""Job-side bookkeeping called by the generated sbatch script around `grow run`.

    python -m orchestrator.slurm.jobstate begin --run-dir D --stage NAME --index I --max-failures N
        exit 0: run the stage; 3: its finished flag exists (the job exits 0 without training);
        4: too many consecutive failures (the job exits 1 and is not requeued)
    python -m orchestrator.slurm.jobstate end ... --rc RC --signalled 0|1
        exit 0: stage finished; 10: requeue (the script runs `scontrol requeue`); 1: give up

An attempt that was signalled (time limit, preemption) and made progress is a requeue, not
a failure. A crash, or a signalled attempt that made no progress, counts as a failure;
`max_failures` of them in a row stop the crash loop. Config and growth-check errors
(exit 2 and 3) are never retried. An attempt whose job Slurm itself requeued (a node of it
died) is `interrupted`: Slurm restarts it, and it is a failure only if it made no progress.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from orchestrator.atomic import read_json, write_json_atomic
from orchestrator.run.state import is_finished, latest_meta
from orchestrator.slurm.paths import stage_state_file
from orchestrator.slurm.queue import query_jobs

EXIT_FINISHED, EXIT_TOO_MANY_FAILURES, EXIT_REQUEUE, EXIT_REQUEUED_BY_SLURM = 3, 4, 10, 11
INTERRUPTED = "interrupted (Slurm requeued the job: a node failed, or it was preempted)"
NOT_RETRIED = (2, 3)  # config error, growth check failed: the same again would fail again


def stage_tokens(run_dir, name: str) -> int:
    meta = latest_meta(run_dir)
    if not meta:
        return 0
    return int(meta.get("ledger", {}).get(name, {}).get("tokens", 0))


def _load(run_dir, name: str) -> dict:
    return read_json(stage_state_file(run_dir, name), {"stage": name, "attempts": [], "failures": 0})


def _save(run_dir, name: str, state: dict) -> None:
    path = stage_state_file(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, state)


def begin(run_dir, name: str, index: int, max_failures: int) -> int:
    if is_finished(latest_meta(run_dir), index):
        print(f"grow: stage {name} already finished; nothing to do")
        return EXIT_FINISHED
    state = _load(run_dir, name)
    last = state["attempts"][-1] if state["attempts"] else None
    if last is not None and "end" not in last:
        _interrupted(run_dir, name, state, last)
    if state["failures"] >= max_failures:
        print(f"grow: stage {name} failed {state['failures']} times in a row "
              f"(submit.max_failures={max_failures}); not running it again", file=sys.stderr)
        return EXIT_TOO_MANY_FAILURES
    state["attempts"].append({"job_id": os.environ.get("SLURM_JOB_ID"),
                              "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                              "node": os.environ.get("SLURMD_NODENAME"),
                              "nodes": int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1),
                              "nodelist": os.environ.get("SLURM_JOB_NODELIST"), "start": time.time(),
                              "tokens_before": stage_tokens(run_dir, name)})
    _save(run_dir, name, state)
    return 0


def _interrupted(run_dir, name: str, state: dict, attempt: dict) -> None:
    """An attempt that Slurm requeued itself (or that never reached `end`: its batch script
    was killed with the node it ran on). It counts as a failure only if it made no progress,
    so a node lost now and then never stops a stage."""
    tokens = stage_tokens(run_dir, name)
    progressed = tokens > attempt.get("tokens_before", 0)
    attempt.setdefault("end", time.time())
    attempt.update({"tokens_after": tokens, "outcome": INTERRUPTED})
    state["failures"] = 0 if progressed else state["failures"] + 1


def requeued_by_slurm() -> bool:
    """Whether Slurm has already requeued this job (it restarts it: a node failed, or it was
    preempted), seen from its batch script after the step ended."""
    job = os.environ.get("SLURM_JOB_ID")
    q = query_jobs([job]).get(job, {}) if job else {}
    return q.get("restarts", 0) > int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) \
        or q.get("state") in ("PENDING", "REQUEUED", "REQUEUE_HOLD")


def end(run_dir, name: str, index: int, rc: int, signalled: bool, max_failures: int) -> int:
    state = _load(run_dir, name)
    attempt = state["attempts"][-1] if state["attempts"] else {"tokens_before": 0}
    tokens = stage_tokens(run_dir, name)
    done = is_finished(latest_meta(run_dir), index)
    if not done and rc != 0 and not signalled and requeued_by_slurm():
        attempt["rc"] = rc
        _interrupted(run_dir, name, state, attempt)
        _save(run_dir, name, state)
        print(f"grow: stage {name}: exit {rc}, {tokens} tokens done -> {INTERRUPTED}")
        return EXIT_REQUEUED_BY_SLURM
    progressed = tokens > attempt.get("tokens_before", 0)
    attempt.update({"end": time.time(), "rc": rc, "signalled": signalled, "tokens_after": tokens})
    if done:  # the stage completed; a signal right at the end (torchrun then exits non-zero) is moot
        outcome, code = "finished", 0
    elif rc in NOT_RETRIED and not signalled:
        outcome, code = "failed (not retried)", 1
    else:
        if signalled and progressed:
            state["failures"] = 0
            outcome = "requeue"
        else:
            state["failures"] += 1
            outcome = "failure"
        if state["failures"] >= max_failures:
            outcome, code = f"gave up after {state['failures']} consecutive failures", 1
        else:
            code = EXIT_REQUEUE
    if outcome == "finished":
        state["failures"] = 0
    attempt["outcome"] = outcome
    _save(run_dir, name, state)
    print(f"grow: stage {name}: exit {rc}{' after a signal' if signalled else ''}, "
          f"{tokens} tokens done -> {outcome}")
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.slurm.jobstate")
    p.add_argument("action", choices=("begin", "end"))
    p.add_argument("--run-dir", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--max-failures", type=int, default=3)
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--signalled", type=int, default=0)
    a = p.parse_args(argv)
    if a.action == "begin":
        return begin(a.run_dir, a.stage, a.index, a.max_failures)
    return end(a.run_dir, a.stage, a.index, a.rc, bool(a.signalled), a.max_failures)


if __name__ == "__main__":
    sys.exit(main())
