"""Progress of a tokenization: bytes of input done out of a known total, with MB/s,
tokens/s and the time left.

On a terminal it is a rich bar, like a stage's training bar (run/stage_loop.py); in a log
(not a terminal) it is one plain line every `every_s` seconds and one at the end, the way a
stage prints its step lines when its console is not a terminal, so logs stay readable.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

MB = 1e6


class TokenizeProgress:
    """`with TokenizeProgress(label, total_bytes) as p: p.advance(bytes, tokens)`."""

    def __init__(self, label: str, total_bytes: int | None, console: Console | None = None, every_s: float = 10.0):
        self.label, self.total = label, total_bytes  # None: not known (no time left shown)
        self.console = console or Console(stderr=True)
        self.every_s = every_s
        self.bytes = self.tokens = 0
        self._skipped_bytes = self._skipped_tokens = 0  # done by an earlier run: not in the rates
        self._start = self._last_line = 0.0
        self._bar = self._task = None

    def __enter__(self) -> "TokenizeProgress":
        self._start = self._last_line = time.perf_counter()
        if self.console.is_terminal:
            self._bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), DownloadColumn(),
                                 TextColumn("{task.fields[rates]}"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, rates="")
        return self

    def start(self) -> None:
        """The clock of the rates starts now: what came before (imports, starting the
        workers) is not the tokenizer's speed, and would skew the time left."""
        self._start = time.perf_counter()

    def skip(self, nbytes: int, tokens: int = 0) -> None:
        """Input done by an earlier run (a resume): counted as done, not in the rates."""
        self._skipped_bytes += nbytes
        self._skipped_tokens += tokens
        self.advance(nbytes, tokens)

    def advance(self, nbytes: int, tokens: int) -> None:
        self.bytes += nbytes
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(self._task, completed=self.bytes, rates=self.rates())
        elif time.perf_counter() - self._last_line >= self.every_s:
            self._last_line = time.perf_counter()
            self.console.print(self.line(), soft_wrap=True, highlight=False, markup=False)

    def complete(self) -> None:
        """All input read: what followed the last document (a file's tail) counts as done."""
        if self.total is not None and self.bytes < self.total:
            self.advance(self.total - self.bytes, 0)

    def _rated(self) -> tuple[float, float, float]:
        """(seconds, bytes, tokens) done by this process, for the rates and the ETA."""
        seconds = max(time.perf_counter() - self._start, 1e-9)
        return seconds, self.bytes - self._skipped_bytes, self.tokens - self._skipped_tokens

    def rates(self) -> str:
        seconds, nbytes, tokens = self._rated()
        return f"{nbytes / MB / seconds:.1f} MB/s {tokens / seconds:,.0f} tok/s"

    def eta_s(self) -> float | None:
        seconds, nbytes, _ = self._rated()
        if self.total is None or nbytes <= 0:
            return None
        return max(0, self.total - self.bytes) * seconds / nbytes

    def line(self) -> str:
        eta = self.eta_s()
        left = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        done = f"{self.bytes / MB:,.1f} MB"
        if self.total is not None:
            done += f"/{self.total / MB:,.1f} MB ({100.0 * self.bytes / max(self.total, 1):.0f}%)"
        return (f"[{self.label}] {done} "
                f"{self.tokens:,} tokens {self.rates()} left {left}")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif exc[0] is None:
            self.console.print(self.line(), soft_wrap=True, highlight=False, markup=False)
