"""`grow` in a process forked from a server that has already imported torch and the
orchestrator, for tests that start many runs where a fresh interpreter is not the point
(kill-and-resume trials): each start costs a fork instead of an interpreter start and a
torch import.

The child is a real, separate process, forked before any run state exists: it calls
`orchestrator.cli.main(argv)` as the `grow` script does, in its own working directory and
environment, so a SIGKILL (a failpoint's or the test's) leaves on disk exactly what it
would leave of a `grow` process. The server is multiprocessing's fork server: it imports
the modules below once and never runs torch code, so no thread pool is copied into the
children.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.cli import main as grow_main

# What `grow run` imports (a name that no longer exists is skipped). None of them starts a
# thread on import (mlflow does, jemalloc's, so each child imports it itself). torch imports
# torch._dynamo on the first normal_() of a meta tensor (the local engine builds its model on
# the meta device): seconds per process.
PRELOAD = ["torch", "torch._dynamo", "numpy", "safetensors.torch", "hydra", "omegaconf", "rich",
           "matplotlib", "matplotlib.pyplot", "orchestrator.cli", "orchestrator.commands.configure",
           "orchestrator.run.runner", "orchestrator.run.stage_loop", "orchestrator.engines.local",
           "orchestrator.data", "orchestrator.model", "orchestrator.tracking.report", "growth_ops",
           "orchestrator.commands.run", "orchestrator.commands.run_job"]

_context = None


def _nothing() -> None:
    pass


def start_fork_server():
    """The fork server with its modules imported, started on first use with one torch
    thread, as the tests' `grow` runs have. Returns once it can fork: a run timed after
    this call is not charged for the imports."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # read once, when the server loads torch
        try:
            first = ctx.Process(target=_nothing)  # served once the imports are done
            first.start()
            first.join()
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = old
        _context = ctx
    return _context


def _grow_main(argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """The child: the `grow` script's life in a forked process, output to two files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code = grow_main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        atexit._run_exitfuncs()  # as the interpreter does at exit (the fork's end skips it)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    os._exit(code or 0)


class ForkedGrow:
    """A started `grow` child: `wait`, `kill` and `returncode` as with subprocess.Popen
    (negative for a signal), and its output once it has ended."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.out")))
        self.out_path, self.err_path = logs / f"{n:03d}.out", logs / f"{n:03d}.err"
        self.process = start_fork_server().Process(target=_grow_main, args=(
            list(argv), str(cwd), dict(env), str(self.out_path), str(self.err_path)))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("grow (forked)", timeout)
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


def start_grow(argv: list[str], cwd: Path, env: dict, logs: Path) -> ForkedGrow:
    """Start `grow ARGV` (the arguments after `grow`) in a forked child."""
    return ForkedGrow(argv, cwd, env, logs)


def run_grow_forked(argv: list[str], cwd: Path, env: dict, logs: Path, timeout: float = 600) -> ForkedGrow:
    """`grow ARGV` in a forked child, to its end (like subprocess.run)."""
    child = start_grow(argv, cwd, env, logs)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise
    return child
