"""Growth at scale: one real growth transition under engine=deepspeed on CPU/gloo, 4 ranks
(tp=2 x pp=2 before and after), width and depth both growing, with Adam moments.

Two `grow run` commands: the first trains stage s1 (the old model) one step and writes its
final checkpoint; the second grows into s2 and is stopped right after s2's step-0
checkpoint is published (GROW_FAILPOINTS=checkpoint.done@1=raise), so the grown model is
never trained here (that would need far more memory than the transition). While it runs,
every rank's anonymous RSS (RssAnon of /proc/<pid>/status: not the file cache the
memory-mapped checkpoints sit in) is sampled every 0.2 s. The transition is the window from
the runner's "resuming after stage s1" line to the moment s2's step-0 checkpoint appears:
the old-model evaluation on the new layout, the growth, the load, the new-model evaluation
and the sealed step-0 checkpoint.

Figures, per rank: peak anonymous RSS in the window over the bound 1.5 x (its slice of the
grown state: its TP/PP share of fp32 weights and both Adam moments) + the largest tensor
(also with the rank's RSS at the window's start taken off: the interpreter, torch,
DeepSpeed and Megatron, ~0.4 GiB, which dominate at small sizes);
and the transition's time over plain I/O of the same bytes on the same disk (write the
grown state's bytes with fsync, read them back, read the old checkpoint). The memory figures
do not depend on the machine's load; the time ratio does, so the load average is recorded
with it (`time_ratio_publishable`: the machine was idle before). Where the time goes: the
phases the run itself recorded in the grown checkpoint's growth record (run/transition.py:
old-model check, building the new engine, growing and writing with the slowest writer's
read / grow / write / hash / sync, loading, new-model check) and the rest of the window
(sealing, the runner's start); and when each rank peaked.

    python -m bench.growth_at_scale                      # ~1B parameters after growth (~13 GB of checkpoints)
    python -m bench.growth_at_scale --quick              # ~15M, a couple of minutes
    python -m bench.growth_at_scale --params 1.5e8 --code /path/to/other/checkout --label today

`--code` runs another checkout's `orchestrator` (PYTHONPATH), e.g. the previous version for
comparison; `--label` names the entry in bench/results/growth_at_scale.json (entries of
other labels are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import REPO, RESULTS, console, machine, run_vocab, stage_literal, table
from bench.transition import plain_io
from growth_ops.spec import ModelSpec, count_parameters

TP, PP = 2, 2
HEAD_DIM = 64
VOCAB = run_vocab()  # the runs' own: the default data's byte tokenizer, padded (320)
SAMPLE_S = 0.2
IDLE_LOAD = 1.0  # 1-minute load average before the transition below which the machine counts as idle


def shapes(params: float) -> tuple[tuple, tuple]:
    """(old, new) shapes (layers, hidden, ffn, heads): the smallest new shape of at least
    `params` parameters whose depth is near hidden / 100; the old one half as deep and wide
    (tp=2 and pp=2 divide both)."""
    found = []
    for hidden in range(512, 1 << 15, 256):
        ffn = 128 * round(2.75 * hidden / 128)
        for layers in range(4, 257, 4):
            if 0.6 <= layers / (hidden / 100) <= 1.4:
                heads = hidden // HEAD_DIM
                p = count_parameters(ModelSpec(layers, hidden, ffn, heads, heads, HEAD_DIM, VOCAB))
                if p >= params:
                    found.append((p, (layers, hidden, ffn, heads)))
    if not found:
        raise SystemExit("--params is too large")
    new = min(found)[1]
    return (new[0] // 2, new[1] // 2, new[2] // 2, new[3] // 2), new


def grow_run(code: Path, run_dir: Path, stages: list[str], extra: list[str], env: dict | None = None):
    overrides = ["engine=deepspeed", "engine.threads=1", "tracking=off", "schedule.name=scale",
                 "schedule.stages=[" + ",".join(stages) + "]", "train.eval_batches=1",
                 "checkpoint.every_steps=1000000", f"hydra.run.dir={run_dir}", *extra]
    cmd = [str(Path(sys.executable).parent / "grow"), "run", *overrides]
    full_env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rss_anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def watch_transition(proc: subprocess.Popen, step0: Path) -> dict:
    """Sample the ranks' anonymous RSS until `proc` ends; the window opens at the runner's
    'resuming after stage' line and closes when `step0` exists."""
    lines: list[str] = []
    marks: dict[str, float] = {}

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "resuming after stage" in line and "start" not in marks:
                marks["start"] = time.time()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ranks: dict[int, int] = {}  # pid -> rank
    peaks: dict[int, int] = {}  # rank -> peak in the window
    first: dict[int, int] = {}  # rank -> at the window's first sample (interpreter, libraries, data)
    peak_at: dict[int, float] = {}  # rank -> seconds into the window of its peak
    driver = psutil.Process(proc.pid)
    while proc.poll() is None:
        now = time.time()
        if "end" not in marks and step0.exists():
            marks["end"] = now
        try:
            children = driver.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            if child.pid not in ranks:
                try:
                    env = child.environ()
                except psutil.Error:  # ended meanwhile
                    continue
                rank = env.get("RANK")
                if rank is None or "LOCAL_RANK" not in env:
                    continue
                ranks[child.pid] = int(rank)
            anon = rss_anon(child.pid)
            if anon is not None and "start" in marks and "end" not in marks:
                rank = ranks[child.pid]
                if anon > peaks.get(rank, 0):
                    peaks[rank], peak_at[rank] = anon, round(now - marks["start"], 1)
                first.setdefault(rank, anon)
        time.sleep(SAMPLE_S)
    reader.join(timeout=5)
    (step0.parents[3] / "transition.log").write_text("".join(lines))  # the whole run's output, kept in --work-dir
    if "end" not in marks and step0.exists():
        marks["end"] = time.time()
    if "start" not in marks or "end" not in marks:
        raise SystemExit("the transition did not complete:\n" + "".join(lines[-40:]))
    return {"peaks": peaks, "first": first, "peak_at": peak_at, "seconds": marks["end"] - marks["start"], "log_tail": "".join(lines[-15:])}


def rank_slices(ckpt: Path, spec: ModelSpec) -> tuple[dict[int, int], int, int]:
    """Bytes of each rank's slice of the checkpoint's weights and moments (ranks: tp
    fastest, then pp), of the largest tensor, and of the whole state."""
    from orchestrator.checkpoint.canonical import open_checkpoint
    from orchestrator.engines.parallel_model import split_dim

    weights, moments, _ = open_checkpoint(ckpt, check=False)
    per_stage = spec.layers // PP
    slices = {r: 0 for r in range(TP * PP)}
    largest = total = 0
    for name in weights:
        dtype, shape = weights.stored(name)
        n = 1
        for s in shape:
            n *= s
        nbytes = n * 4 * (1 + (2 if name in moments["exp_avg"] else 0))
        largest, total = max(largest, n * 4), total + nbytes
        for r in slices:
            pp_rank = r // TP
            layer = int(name.split(".")[1]) if name.startswith("layers.") else None
            on_stage = (layer is None and name.startswith("embed") and (pp_rank == 0 or spec.tie_embeddings)) or \
                (layer is None and not name.startswith("embed") and pp_rank == PP - 1) or \
                (layer is not None and layer // per_stage == pp_rank)
            if on_stage:
                slices[r] += nbytes // (TP if split_dim(name) is not None else 1)
    return slices, largest, total


def transition_phases(step0: Path, window_s: float) -> dict:
    """The phases the run recorded in the grown checkpoint's growth record (meta.json), and
    what the window holds besides: the runner's start up to the transition, and the seal."""
    phases = json.loads((step0 / "meta.json").read_text())["growth"].get("phases") or {}
    inside = sum(v for k, v in phases.items() if not k.startswith("writer_"))
    return {**phases, "seal_and_rest": round(window_s - inside, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, default=1e9, help="parameters after growth (at least)")
    p.add_argument("--quick", action="store_true", help="~15M parameters after growth")
    p.add_argument("--code", default=str(REPO), help="checkout whose orchestrator runs the transition")
    p.add_argument("--label", default=None, help="entry name in the results (default: bounded, or quick)")
    p.add_argument("--work-dir", default=None, help="where the run goes (default: a temp dir; it is removed)")
    p.add_argument("--out", default=str(RESULTS / "growth_at_scale.json"))
    a = p.parse_args(argv)
    params = 1e7 if a.quick else a.params
    old, new = shapes(params)
    spec = ModelSpec(new[0], new[1], new[2], new[3], new[3], HEAD_DIM, VOCAB)
    # the 4 ranks hold ~16 B/param (DeepSpeed's fp32 ZeRO-1: weights, their fp32 partition, two
    # moments) plus ~0.5 GiB each; today's in-memory transition ~70 B/param: the machine is shared
    need = (70 if a.code != str(REPO) else 17) * count_parameters(spec) + 2 * 2**30
    avail = psutil.virtual_memory().available
    if need > avail:
        raise SystemExit(f"the transition needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB are available "
                         "now; choose a smaller --params")
    root = Path(a.work_dir or tempfile.mkdtemp(prefix="growth_at_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    layout = f",layout:{{tp:{TP},pp:{PP}}}}}"
    step = 4 * 32
    stages = [stage_literal("s1", old, step, 4, 32, 1e-3, 0, 1e-4)[:-1] + layout,
              stage_literal("s2", new, 2 * step, 4, 32, 1e-3, 1, 1e-4, {"operator": "msg", "ramp_steps": 1})[:-1]
              + layout]
    console.print(f"s1 {old} -> s2 {new}: {count_parameters(spec) / 1e9:.3f}B parameters after growth; "
                  f"training s1 one step ...")
    first = grow_run(Path(a.code), run_dir, stages, ["run.only_stage=s1"])
    out, _ = first.communicate()
    if first.returncode != 0:
        raise SystemExit(f"stage s1 failed:\n{out[-3000:]}")
    load_before = os.getloadavg()
    console.print("growing into s2 ...")
    step0 = run_dir / "checkpoints" / "1-s2" / "step_00000000"
    second = grow_run(Path(a.code), run_dir, stages, [], {"GROW_FAILPOINTS": "checkpoint.done@1=raise"})
    watched = watch_transition(second, step0)
    load_after = os.getloadavg()
    old_ckpt = sorted((run_dir / "checkpoints" / "0-s1").glob("step_*"))[-1]
    slices, largest, total = rank_slices(step0, spec)
    old_bytes = sum(f.stat().st_size for f in old_ckpt.iterdir())
    new_bytes = sum(f.stat().st_size for f in step0.iterdir())
    io = plain_io(new_bytes, root)
    t = time.perf_counter()
    for f in old_ckpt.iterdir():
        with open(f, "rb") as h:
            while h.read(1 << 24):
                pass
    io["read_old_s"] = time.perf_counter() - t
    io["total_s"] += io["read_old_s"]
    phases = transition_phases(step0, watched["seconds"])
    ranks = {}
    for r in sorted(slices):
        bound = 1.5 * slices[r] + largest
        peak = watched["peaks"].get(r, 0)
        base = watched["first"].get(r, 0)
        ranks[r] = {"peak_anon_bytes": peak, "anon_at_start_bytes": base, "slice_bytes": slices[r],
                    "bound_bytes": bound, "peak_over_bound": peak / bound, "peak_at_s": watched["peak_at"].get(r),
                    "growth_over_bound": (peak - base) / bound, "peak_over_slice": peak / slices[r]}
    result = {"params_before": count_parameters(ModelSpec(old[0], old[1], old[2], old[3], old[3], HEAD_DIM, VOCAB)),
              "params_after": count_parameters(spec), "shapes": {"old": old, "new": new},
              "layout": {"tp": TP, "pp": PP, "dp": 1}, "full_state_bytes": total, "largest_tensor_bytes": largest,
              "old_checkpoint_bytes": old_bytes, "new_checkpoint_bytes": new_bytes, "ranks": ranks,
              "max_peak_over_bound": max(x["peak_over_bound"] for x in ranks.values()),
              "max_growth_over_bound": max(x["growth_over_bound"] for x in ranks.values()),
              "transition_s": watched["seconds"], "plain_io_s": io["total_s"], "plain_io": io,
              "transition_over_plain_io": watched["seconds"] / io["total_s"], "phases_s": phases,
              "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
              # the memory figures hold on any machine; the time ratio only if nothing else ran
              "time_ratio_publishable": load_before[0] < IDLE_LOAD,
              "code": a.code, "machine": machine()}
    table(f"growth transition, {result['params_after'] / 1e9:.3f}B parameters after growth, tp=2 pp=2",
          ["rank", "peak anon GiB", "at start GiB", "slice GiB", "1.5 x slice + largest GiB", "peak / bound",
           "(peak - start) / bound"],
          [[r, x["peak_anon_bytes"] / 2**30, x["anon_at_start_bytes"] / 2**30, x["slice_bytes"] / 2**30,
            x["bound_bytes"] / 2**30, x["peak_over_bound"], x["growth_over_bound"]] for r, x in ranks.items()])
    table("where the transition's time goes (writer_*: the slowest writer's share of grow_write)",
          ["phase", "seconds"], [[k, round(v, 2)] for k, v in phases.items()])
    console.print(f"full state {total / 2**30:.2f} GiB; transition {watched['seconds']:.1f} s, plain I/O "
                  f"{io['total_s']:.1f} s, ratio {result['transition_over_plain_io']:.2f}; load average "
                  f"{load_before[0]:.1f} -> {load_after[0]:.1f}"
                  + ("" if result["time_ratio_publishable"] else " (not idle: the time ratio is not a figure)"))
    path = Path(a.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    results[a.label or ("quick" if a.quick else "bounded")] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    console.print(f"wrote {path}")
    if not a.work_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
