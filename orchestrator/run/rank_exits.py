"""How the ranks of one stage's launch ended, said in the one line `grow` prints after it.

torchrun's own exit status says only that something failed (1 for any failed rank, -N when
the agent itself was killed), and its failure table is easy to miss above the driver's last
line. So the driver starts the agent through `run_agent` (`python -m
orchestrator.run.rank_exits REPORT <torchrun arguments>`), which is torchrun's `main` plus
a JSON report of every failed rank (rank, pid, exit code, the exception its error file
recorded) written when the agent gives up; `explain` turns that report, or the agent's own
death, into what happened (which rank, which signal or status) and what to do: run the
same command again only where that can help (a kill, a preemption, a crash that may not
repeat), never after an error the rank has already explained and that would repeat (a
config, data or checkpoint error: its own `grow:` line says what to fix).
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from orchestrator.atomic import read_json, write_json_atomic

RESUME = "run the same command again to resume from the last checkpoint"
# exit statuses a rank gives after printing its own one-line reason (orchestrator/exits.py)
EXPLAINED = {1: "a checkpoint, disk or divergence error", 2: "a config or data error", 3: "a failed growth check"}
SIGNAL_HINTS = {signal.SIGKILL: "out of memory? see dmesg, or the job's memory limit",
                signal.SIGSEGV: "a crash in native code", signal.SIGBUS: "a crash in native code",
                signal.SIGABRT: "an abort in native code", signal.SIGTERM: "stopped from outside",
                signal.SIGINT: "interrupted"}


@dataclass(frozen=True)
class RankExit:
    """One failed rank as the agent saw it: `exitcode` < 0 is death by signal -exitcode;
    `error` is the exception its error file recorded (an uncaught one), else None."""

    rank: int
    pid: int
    exitcode: int
    error: str | None = None
    timestamp: int = 0


def signal_words(signum: int) -> str:
    """'SIGKILL (signal 9; out of memory? ...)'."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    hint = SIGNAL_HINTS.get(signum)
    return f"{name} (signal {signum}{'; ' + hint if hint else ''})"


def explain(stage: str, agent_status: int, agent_pid: int, failures: list[RankExit]) -> tuple[str, int]:
    """The line `grow` prints after stage `stage`'s torchrun (pid `agent_pid`) ended with
    `agent_status`, and the exit status `grow` returns."""
    head = f"stage {stage} failed: "
    if agent_status < 0:
        return (head + f"its torchrun agent (pid {agent_pid}) was killed by {signal_words(-agent_status)}; "
                f"its ranks end with it; {RESUME}"), 1
    if not failures:
        return head + f"torchrun exited with status {agent_status} (see its error above); {RESUME}", 1
    first = min(failures, key=_cause_first)
    who = f"rank {first.rank} (pid {first.pid})"
    if first.exitcode < 0:
        return head + f"{who} was killed by {signal_words(-first.exitcode)}; {RESUME}", 1
    if first.exitcode > 128:
        return (head + f"{who} stopped on {signal_words(first.exitcode - 128)} after writing a checkpoint; "
                f"{RESUME}"), first.exitcode
    if first.error is not None:
        return (head + f"{who} raised {first.error} (traceback above); if that does not repeat "
                f"(a lost peer, a network error), {RESUME}"), 1
    why = EXPLAINED.get(first.exitcode, "an error")
    return (head + f"{who} exited with status {first.exitcode} ({why}: its 'grow:' line above says what to fix; "
            "running the same command again would repeat it)"), first.exitcode


def _cause_first(f: RankExit) -> tuple:
    """Order of the failed ranks, the likely cause first: torchrun ends the ranks still running
    with SIGTERM once one has failed (they are in its report too), and a peer's exception a
    moment after a rank died (a closed connection) follows from that death."""
    return f.exitcode == -signal.SIGTERM, f.exitcode >= 0, f.timestamp, f.rank


def read_report(report: Path) -> list[RankExit]:
    """The failed ranks `run_agent` wrote to `report` (none: the agent wrote no report)."""
    return [RankExit(**f) for f in read_json(report, default=[]) or []]


def _error_of(failure) -> str | None:
    """The exception a rank's error file recorded ('Type: message'), if it wrote one (`@record`
    writes one for an uncaught exception only; torchrun marks a missing one '<N/A>')."""
    if failure.error_file == "<N/A>":
        return None
    data = failure.error_file_data.get("message") if failure.error_file_data else None
    if isinstance(data, dict):
        data = data.get("message")
    return data if isinstance(data, str) and data else None


def run_agent(report: str, args: list[str]) -> None:
    """torchrun with `args`; when its ranks fail, each failed rank is written to `report`
    before torchrun's own error (its failure table) goes on as before."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(args)
    except ChildFailedError as e:
        write_json_atomic(Path(report), [
            {"rank": rank, "pid": f.pid, "exitcode": f.exitcode, "error": _error_of(f), "timestamp": f.timestamp}
            for rank, f in e.failures.items()])
        raise


if __name__ == "__main__":
    run_agent(sys.argv[1], sys.argv[2:])
