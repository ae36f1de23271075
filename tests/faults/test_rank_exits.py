"""After a multi-rank stage fails, `grow` says which rank ended how (the signal that killed
it, the status it gave, the exception it raised) and advises a rerun only where one can
help. The report comes from a real torchrun agent (orchestrator/run/rank_exits.py) whose
rank kills itself with SIGKILL; the wording for each kind of end is checked in-process.
The same through `grow run engine=deepspeed`: tests/engines/test_deepspeed.py
(test_killed_rank_ends_the_job_fast)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from orchestrator.run.rank_exits import RESUME, RankExit, explain, read_report

from ..conftest import REPO

# rank 1 dies by SIGKILL as an out-of-memory kill would end it; rank 0 waits to be stopped
RANKS = """
import os, signal, time
if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
"""


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_named_with_its_signal(tmp_path):
    script, report = tmp_path / "ranks.py", tmp_path / "exits.json"
    script.write_text(RANKS)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.run.rank_exits", str(report), "--standalone",
                           "--nproc_per_node", "2", "--max-restarts", "0", "--monitor-interval", "0.2", str(script)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    failures = read_report(report)
    killed = [f for f in failures if f.rank == 1]
    assert [(f.exitcode, f.error) for f in killed] == [(-signal.SIGKILL, None)]  # no exception: a kill
    # rank 0, if listed, was ended by torchrun
    assert all(f.exitcode == -signal.SIGTERM for f in failures if f.rank == 0)
    line, status = explain("s1", proc.returncode, 4242, failures)
    assert line == (f"stage s1 failed: rank 1 (pid {killed[0].pid}) was killed by SIGKILL (signal 9; out of "
                    f"memory? see dmesg, or the job's memory limit); {RESUME}")
    assert status == 1


def test_each_kind_of_end_is_explained_and_advised_only_when_a_rerun_helps():
    def said(agent_status: int, *failures: RankExit) -> tuple[str, int]:
        return explain("s2", agent_status, 77, list(failures))

    line, status = said(-signal.SIGKILL)  # the agent itself
    assert line.startswith("stage s2 failed: its torchrun agent (pid 77) was killed by SIGKILL (signal 9")
    assert "its ranks end with it" in line and line.endswith(RESUME) and status == 1
    # a config error the rank explained in its own line: a rerun repeats it
    line, status = said(1, RankExit(rank=0, pid=5, exitcode=2, timestamp=10))
    assert "rank 0 (pid 5) exited with status 2 (a config or data error" in line
    assert RESUME not in line and "would repeat it" in line and status == 2
    # a checkpoint error (status 1, no traceback): the same
    line, status = said(1, RankExit(rank=1, pid=6, exitcode=1, timestamp=10))
    assert "status 1 (a checkpoint, disk or divergence error" in line and RESUME not in line and status == 1
    # a peer's exception right after a rank crashed, a third rank ended by torchrun: the crash is the cause
    line, status = said(1, RankExit(rank=0, pid=5, exitcode=1, error="RuntimeError: Connection closed by peer",
                                    timestamp=9),
                        RankExit(rank=1, pid=6, exitcode=-signal.SIGSEGV, timestamp=10),
                        RankExit(rank=2, pid=7, exitcode=-signal.SIGTERM, timestamp=8))
    assert "rank 1 (pid 6) was killed by SIGSEGV (signal 11; a crash in native code)" in line
    assert line.endswith(RESUME)
    line, _ = said(1, RankExit(rank=2, pid=7, exitcode=-signal.SIGTERM, timestamp=8))  # SIGTERM alone: from outside
    assert "rank 2 (pid 7) was killed by SIGTERM (signal 15; stopped from outside)" in line
    # an uncaught exception alone: maybe transient, so the advice is conditional
    line, _ = said(1, RankExit(rank=1, pid=6, exitcode=1, error="RuntimeError: NCCL timeout", timestamp=10))
    assert "rank 1 (pid 6) raised RuntimeError: NCCL timeout (traceback above); if that does not repeat" in line
    # a rank stopped by a signal after its checkpoint (Slurm's warning): resumable, status kept
    line, status = said(1, RankExit(rank=0, pid=5, exitcode=128 + signal.SIGUSR1, timestamp=10))
    assert "stopped on SIGUSR1" in line and line.endswith(RESUME) and status == 128 + signal.SIGUSR1
    # torchrun failing before any rank ran
    line, status = said(1)
    assert line == f"stage s2 failed: torchrun exited with status 1 (see its error above); {RESUME}"


# an "agent" that starts a "rank" in a session of its own, as torch does, then waits
AGENT = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c",
    "from orchestrator.run.launch import die_with_agent; die_with_agent(); print('armed', flush=True); "
    "import time; time.sleep(120)"], start_new_session=True, stdout=subprocess.PIPE, text=True)
assert rank.stdout.readline().strip() == "armed"
print(rank.pid, flush=True)
time.sleep(120)
"""


def test_a_rank_dies_with_its_agent(tmp_path):
    """A SIGKILLed agent takes its ranks along (they sit in sessions of their own, which a
    kill of `grow run`'s process group does not reach), instead of leaving them waiting on
    their peers until the collective timeout."""
    import psutil
    agent = subprocess.Popen([sys.executable, "-c", AGENT], stdout=subprocess.PIPE, text=True, cwd=REPO)
    rank = psutil.Process(int(agent.stdout.readline()))
    agent.kill()
    agent.wait()
    rank.wait(timeout=30)  # psutil.TimeoutExpired if it outlived its agent
    assert not rank.is_running()
