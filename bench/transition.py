"""Stage transition cost: end of one stage -> first step of the next, through the real runner.

Each repetition is a real two-stage `grow run` (tracking off): stage 1 trains a few steps,
then the runner writes its final checkpoint, reads it back, checks the growth (fp32
validation loss before and after), grows weights and Adam moments, loads the new engine,
writes the grown step-0 checkpoint and starts stage 2. The transition is measured from the
run's own metrics.jsonl: from the last record of stage 1 (its final validation loss, written
right before the final checkpoint) to the start of stage 2's first step (its record's time
minus the step's own duration).

The reference is plain I/O on the same disk: writing (with fsync) and reading back once the
bytes the transition writes - stage 1's final checkpoint plus the grown checkpoint - measured
in the same process right after each run. The figure is transition / plain I/O (aim <= 3).

    python -m bench.transition                                   # ~0.8 GB of checkpoints, a few minutes
    python -m bench.transition --old 4x512x1408x8 --new 4x1024x2816x16 --operator msg --reps 3
    python -m bench.transition --operator stack --new 8x512x1408x8

Writes bench/results/transition.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, console, machine, median, stage_literal, table, write_json

CHUNK = 1 << 24


def shape(s: str):
    return tuple(int(x) for x in s.lower().split("x"))


def run_transition(a, run_dir: Path) -> dict:
    old, new = shape(a.old), shape(a.new)
    step = a.batch * a.seq
    growth = {"operator": a.operator, "ramp_steps": a.ramp if a.operator == "msg" else 0,
              "layer_insert": "append" if a.operator == "stack" else "interleave"}
    stages = [stage_literal("s1", old, a.steps1 * step, a.batch, a.seq, 1e-3, 1, 1e-4),
              stage_literal("s2", new, a.steps2 * step, a.batch, a.seq, 1e-3, 1, 1e-4, growth)]
    overrides = ["tracking=off", f"growth={a.operator}", "schedule.name=transition",
                 "schedule.stages=[" + ",".join(stages) + "]", "train.eval_batches=1",
                 "checkpoint.every_steps=1000000", f"hydra.run.dir={run_dir}"]
    if a.threads:
        overrides.append(f"engine.threads={a.threads}")
    cmd = [str(Path(sys.executable).parent / "grow"), "run", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"grow run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    end1 = max(r["time"] for r in recs if r["stage"] == "s1")
    first2 = next(r for r in recs if r["stage"] == "s2" and "perf/tokens_per_s" in r)
    start2 = first2["time"] - step / first2["perf/tokens_per_s"]
    ckpts = run_dir / "checkpoints"
    old_ckpt = sorted((ckpts / "0-s1").glob("step_*"))[-1]
    new_ckpt = ckpts / "1-s2" / "step_00000000"
    size = {str(c.relative_to(ckpts)): sum(f.stat().st_size for f in c.iterdir()) for c in (old_ckpt, new_ckpt)}
    return {"transition_s": start2 - end1, "checkpoint_bytes": size}


def plain_io(nbytes: int, where: Path) -> dict:
    """Write `nbytes` (fsynced) to a file in `where`, then read them back once."""
    path = where / "plain_io.bin"
    block = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:min(left, CHUNK)])
            left -= CHUNK
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(where, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass
    read_s = time.perf_counter() - t
    path.unlink()
    return {"write_s": write_s, "read_s": read_s, "total_s": write_s + read_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default="4x512x1408x8", help="stage 1 shape LAYERSxHIDDENxFFNxHEADS")
    p.add_argument("--new", default="4x1024x2816x16", help="stage 2 shape")
    p.add_argument("--operator", default="msg")
    p.add_argument("--ramp", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps1", type=int, default=2)
    p.add_argument("--steps2", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="where runs and the plain-I/O file go (default: a temp dir)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    root = Path(a.work_dir or tempfile.mkdtemp(prefix="transition_"))
    root.mkdir(parents=True, exist_ok=True)
    reps = []
    for i in range(a.reps):
        run_dir = root / f"run{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        console.print(f"rep {i + 1}/{a.reps}: grow run ...")
        tr = run_transition(a, run_dir)
        nbytes = sum(tr["checkpoint_bytes"].values())
        io = plain_io(nbytes, root)
        shutil.rmtree(run_dir, ignore_errors=True)
        reps.append({**tr, "bytes": nbytes, "plain_io": io, "ratio": tr["transition_s"] / io["total_s"]})
        console.print(f"  transition {tr['transition_s']:.2f} s, plain write+read of {nbytes / 1e6:.0f} MB "
                      f"{io['total_s']:.2f} s, ratio {reps[-1]['ratio']:.2f}")
    trans = median([r["transition_s"] for r in reps])
    plain = median([r["plain_io"]["total_s"] for r in reps])
    result = {"transition_s": trans, "plain_io_s": plain, "ratio": trans / plain,
              "ratio_median_of_reps": median([r["ratio"] for r in reps]), "bytes": reps[0]["bytes"],
              "old": a.old, "new": a.new, "operator": a.operator, "reps": reps, "args": vars(a), "machine": machine()}
    table(f"stage transition {a.old} -> {a.new} ({a.operator}), median of {a.reps}",
          ["what", "seconds", "MB"],
          [["transition (final ckpt, read, growth check, grow, load, grown ckpt)", trans, reps[0]["bytes"] / 1e6],
           ["plain write (fsync) + read of the same bytes", plain, reps[0]["bytes"] / 1e6],
           ["ratio", trans / plain, None]])
    write_json("transition.json", result, a.out)
    if not a.work_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
