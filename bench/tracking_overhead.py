"""MLflow tracking overhead: step time with logging on (sqlite store in a temp dir) vs off.

One process, one engine, one data stream; two run contexts built by the runner's own
RunContext - one with MLflow tracking on (MlflowTracker, sqlite store in a temp dir), one
with tracking off (NullTracker) - and a StageLoop on each. Steps go in short alternating blocks
(off, on, on, off, ...: bench/common.interleaved), pair after pair until the spread of the
paired on/off ratios is small; every step does exactly what the stage loop does after a train step:
ledger, `StageLoop._log` (metrics.jsonl + tracker.flush) and the budget watch. The tracker
flushes on its own clock (tracking.flush_every_s); the time spent in off blocks is taken off
that clock, so flushes happen as often per on-step as in a run with tracking always on.
Overhead = the mean over pairs of (on block / off block) - 1 (aim < 1%), published only if
its spread (2 standard errors) is within the effect or the 1% resolution and the machine was
not busy (load average beyond this bench's threads <= 0.75 per core); else nothing is
written and the exit status is 1. The
time spent inside tracker.flush (the only extra work when on) is timed too: per flush it
does not depend on the step time, so flush_s_per_send / flush_every_s is the overhead a run
with steps shorter than the flush interval pays, whatever the machine's load.

    python -m bench.tracking_overhead                          # ~1-4 min on 2 idle cores
    python -m bench.tracking_overhead --shape 4x128x352x4 --block-steps 10 --target-spread 0.003

Also reports the one-time costs (tracker start, stage-run creation, finish). Writes
bench/results/tracking_overhead.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import (check_quiet, console, interleaved, machine, median, one_stage_config, publish_timing,
                          table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="2x128x352x4", help="LAYERSxHIDDENxFFNxHEADS")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--block-steps", type=int, default=8)
    p.add_argument("--min-pairs", type=int, default=6, help="pairs of (on, off) blocks at least")
    p.add_argument("--max-pairs", type=int, default=40, help="... and at most, until the spread is --target-spread")
    p.add_argument("--target-spread", type=float, default=0.005, help="stop once 2 standard errors are this small")
    p.add_argument("--resolution", type=float, default=0.01,
                   help="smallest overhead resolved (the aim, 1%%); a wider spread than this and the effect: refused")
    p.add_argument("--max-load", type=float, help="busy above this 1-minute load average (default 0.75 x cores)")
    p.add_argument("--flush-every-s", type=float, default=None, help="default: the tracking config's")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    start_load = check_quiet(a.max_load)
    if a.threads:
        torch.set_num_threads(a.threads)
    from rich.console import Console

    from orchestrator.data import new_cursor, next_global_batch
    from orchestrator.engines.local import LocalEngine
    from orchestrator.model import build_model
    from orchestrator.run.runner import open_run
    from orchestrator.run.stage_loop import StageLoop
    from orchestrator.run.state import RunState
    from orchestrator.schedule import ResolvedStage

    shape = tuple(int(x) for x in a.shape.split("x"))
    steps = 2 * a.max_pairs * a.block_steps + 10
    cfg, spec, data = one_stage_config(shape, a.batch, a.seq, steps=steps)
    tmp = Path(tempfile.mkdtemp(prefix="tracking_overhead_"))
    quiet = Console(file=io.StringIO())
    on_tracking = dataclasses.replace(cfg.tracking, enabled=True, uri=f"sqlite:///{tmp / 'mlflow.db'}",
                                      experiment="bench-tracking-overhead",
                                      flush_every_s=a.flush_every_s or cfg.tracking.flush_every_s)
    off_tracking = dataclasses.replace(cfg.tracking, enabled=False)
    stage = cfg.schedule.stages[0]
    engine = LocalEngine(cfg, ResolvedStage.alone(stage, spec))
    engine.load(build_model(spec, seed=0).canonical_state(), None, 0, None)
    one_time = {}
    loops = {}
    for mode, tracking in (("on", on_tracking), ("off", off_tracking)):
        run_dir = tmp / mode
        run_dir.mkdir()
        c = dataclasses.replace(cfg, run_dir=str(run_dir), tracking=tracking)
        t = time.perf_counter()
        run = open_run(c, quiet, leader=True)
        resolved = run.schedule[0]
        state = RunState(stage_index=0, stage_name=stage.name, steps_total=resolved.steps, spec=resolved.spec,
                         lr_peak=stage.lr.peak, data_cursor=new_cursor(sorted(run.data.train)),
                         ledger=run.budget.ledger)
        loop = StageLoop(run, resolved, engine, state)
        run.budget.stage_start(0, 0)
        one_time[f"start_{mode}_s"] = time.perf_counter() - t
        loops[mode] = loop
    cursor = new_cursor(sorted(data.train))
    streams = {n: data.train[n] for n in sorted(data.train)}

    def step(loop) -> float:
        nonlocal cursor
        st = loop.state
        t = time.perf_counter()
        batch, cursor = next_global_batch(streams, cursor, None, a.batch, a.seq)
        st.lr = 1e-3
        loss, gn = engine.train_step(batch, st.lr)
        st.step += 1
        dt = time.perf_counter() - t
        loop._log(loss, gn, 1.0, dt, loop.ctx.budget.count_step(loop.stage, st.step, dt))
        return time.perf_counter() - t

    for _ in range(3):  # warm-up, untimed
        step(loops["off"])
    flush_calls = {"n": 0, "s": 0.0, "sent": 0}
    tracker = loops["on"].ctx.tracker
    real_flush = tracker.flush

    def counted_flush(force: bool = False):
        before = tracker.info["sent_offset"]
        t = time.perf_counter()
        real_flush(force)
        flush_calls["s"] += time.perf_counter() - t
        flush_calls["n"] += 1
        flush_calls["sent"] += tracker.info["sent_offset"] != before
    tracker.flush = counted_flush

    def block(mode: str) -> float:
        t = time.perf_counter()
        for _ in range(a.block_steps):
            step(loops[mode])
        took = time.perf_counter() - t
        if mode == "off":  # off time does not count toward the tracker's flush interval
            tracker._last_flush += took
        return took

    timing = interleaved({"off": lambda: block("off"), "on": lambda: block("on")}, a.target_spread,
                         a.min_pairs, a.max_pairs, a.max_load)
    blocks = timing["blocks_s"]
    t = time.perf_counter()
    loops["on"].ctx.tracker.finish("FINISHED")
    one_time["finish_on_s"] = time.perf_counter() - t
    for loop in loops.values():
        loop.ctx.metrics.close()
    per_step = {m: sum(v) / (len(v) * a.block_steps) for m, v in blocks.items()}
    med = {m: median(v) / a.block_steps for m, v in blocks.items()}
    result = {"overhead_pct": 100 * timing["effect"], "spread_pct": 100 * timing["spread"],
              "pairs": timing["pairs"], "resolution_pct": 100 * a.resolution,
              "overhead_pct_median_blocks": 100 * (med["on"] / med["off"] - 1),
              "step_s_on": per_step["on"], "step_s_off": per_step["off"],
              "flushes_sent": flush_calls["sent"], "flush_calls": flush_calls["n"], "flush_s_total": flush_calls["s"],
              "flush_pct_of_on_time": 100 * flush_calls["s"] / sum(blocks["on"]),
              "flush_s_per_send": flush_calls["s"] / max(1, flush_calls["sent"]),
              "flush_every_s": on_tracking.flush_every_s,
              "one_time": one_time, "timing": timing, "args": vars(a), "machine": machine(),
              "loadavg_1_start": start_load,
              "store": on_tracking.uri}
    table(f"MLflow logging overhead ({a.shape}, batch {a.batch} x {a.seq}, {timing['pairs']} pairs of "
          f"{a.block_steps}-step blocks)",
          ["tracking", "s/step (mean)", "s/step (median block)", "flushes sent", "time in flush (s)"],
          [["off", per_step["off"], med["off"], None, None],
           ["on (sqlite)", per_step["on"], med["on"], flush_calls["sent"], flush_calls["s"]]])
    console.print(f"overhead {result['overhead_pct']:+.2f}% +- {result['spread_pct']:.2f}% (mean of paired ratios, "
                  f"2 standard errors), {result['overhead_pct_median_blocks']:+.2f}% "
                  f"(median blocks); time inside tracker.flush = {result['flush_pct_of_on_time']:.2f}% of on time; "
                  f"one-time: {', '.join(f'{k} {v:.2f}s' for k, v in one_time.items())}")
    shutil.rmtree(tmp, ignore_errors=True)
    return publish_timing("tracking_overhead.json", result, [timing], a.resolution, torch.get_num_threads(), a.out)


if __name__ == "__main__":
    raise SystemExit(main())
