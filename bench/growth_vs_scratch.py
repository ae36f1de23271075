"""Growth vs training from scratch, through the real runner (`grow run`).

Trains the final shape from scratch for T tokens, then growth schedules that end at the
same shape (one per operator), every one a real `grow run` with tracking off into its own
run directory. From each run's metrics.jsonl it takes validation loss against cumulative
FLOPs (the ledger's progress/flops) and elapsed wall time (metrics' time stamps: steps,
evaluations, checkpoints and growths all count), and reports the FLOPs and the wall time
each schedule needed to reach the scratch run's final validation loss, as fractions of the
scratch run's (linear interpolation between evaluation points; null if never reached).

    python bench/growth_vs_scratch.py                      # default: CPU, ~4 min on 2 idle cores, 25-35 busy
    python bench/growth_vs_scratch.py --size large         # a GPU (engine.device=auto), one run at a time
    python bench/growth_vs_scratch.py --operators msg,stack --split 0.25,0.25,0.5 --growth-tokens 1.0 --decay-in each

The small size runs its 5 runs at once, one torch thread each (--jobs 5 --threads 1): on 2
cores that finishes sooner than one after another, and the scratch run, the longest, has the
machine more to itself at its end, so the growth runs' wall_frac is if anything overstated.

Schedules (3 stages each; --split gives each stage's share of the schedule's tokens,
--growth-tokens the schedule's tokens as a multiple of the scratch run's T):
  msg, zero, clone: width x2 (hidden, ffn, heads; head_dim fixed), then depth x2;
  stack (grows depth only): depth x2, then x2 again at the final width.
Every stage warms (re-warms after a growth) to --peak-lr over --rewarm steps; by default
(--decay-in last) the earlier stages then hold the peak and only the last stage decays
(cosine) to --min-lr-frac x peak, as the scratch run does over its whole length; --decay-in
each decays within every stage (a visible bump at each re-warm, and later crossings). Runs are cached in
--work-dir by their overrides: a second call with the same settings reuses finished runs.
Writes bench/results/growth_vs_scratch.json and growth_vs_scratch.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, console, machine, table, write_json  # noqa: E402

# shape = (layers, hidden, ffn, heads)
SIZES = {
    "small": dict(final=(4, 128, 352, 4), width_path=[(2, 64, 176, 2), (2, 128, 352, 4)],
                  depth_path=[(1, 128, 352, 4), (2, 128, 352, 4)], tokens=655360, batch=16, seq=128,
                  peak_lr=3e-3, warmup=30, eval_every=10, eval_batches=4, jobs=5, threads=1),
    "large": dict(final=(8, 512, 1408, 8), width_path=[(4, 256, 704, 4), (4, 512, 1408, 8)],
                  depth_path=[(2, 512, 1408, 8), (4, 512, 1408, 8)], tokens=52428800, batch=32, seq=256,
                  peak_lr=1e-3, warmup=200, eval_every=50, eval_batches=8, jobs=1, threads=0),
}


def stage(name: str, shape, tokens: int, a, peak: float, warmup: int, growth: dict | None,
          decay: str = "cosine") -> str:
    layers, hidden, ffn, heads = shape
    g = "null" if growth is None else "{" + ",".join(f"{k}:{v}" for k, v in growth.items()) + "}"
    return (f"{{name:{name},shape:{{layers:{layers},hidden:{hidden},ffn:{ffn},heads:{heads},kv_heads:null}},"
            f"tokens:{tokens},batch_size:{a.batch},seq_len:{a.seq},"
            f"lr:{{peak:{peak},warmup_steps:{warmup},min:{peak * a.min_lr_frac:.3g},decay:{decay}}},growth:{g}}}")


def whole_steps(tokens: float, a) -> int:
    step = a.batch * a.seq
    return max(1, int(round(tokens / step))) * step


def schedules(a) -> dict[str, list[str]]:
    """name -> the Hydra overrides of its `grow run`."""
    size = SIZES[a.size]
    common = ["tracking=off", f"train.eval_every_steps={a.eval_every}", f"train.eval_batches={a.eval_batches}",
              "checkpoint.every_steps=1000000", f"seed={a.seed}"]
    if a.threads:
        common.append(f"engine.threads={a.threads}")
    out = {"scratch": common + ["schedule.name=scratch",
                                "schedule.stages=[" + stage("final", size["final"], whole_steps(a.tokens, a), a,
                                                            a.peak_lr, a.warmup, None) + "]"]}
    split = [float(x) for x in a.split.split(",")]
    total = a.tokens * a.growth_tokens
    for op in a.operators.split(","):
        path = (size["depth_path"] if op == "stack" else size["width_path"]) + [size["final"]]
        growth = {"operator": op, "ramp_steps": a.ramp if op == "msg" else 0,
                  "layer_insert": "append" if op == "stack" else a.layer_insert}
        stages = []
        for i, (shape, frac) in enumerate(zip(path, split)):
            decay = "constant" if a.decay_in == "last" and i < len(path) - 1 else "cosine"
            stages.append(stage(f"s{i + 1}", shape, whole_steps(total * frac / sum(split), a), a, a.peak_lr,
                                a.warmup if i == 0 else a.rewarm, None if i == 0 else growth, decay))
        out[op] = common + [f"growth={op}", f"schedule.name=grow_{op}", "schedule.stages=[" + ",".join(stages) + "]"]
    return out


def run_one(name: str, overrides: list[str], work: Path, quiet: bool) -> Path:
    key = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:10]
    run_dir = work / f"{name}-{key}"
    if (run_dir / "summary.json").exists() and json.loads((run_dir / "summary.json").read_text())["status"] == "complete":
        console.print(f"{name}: reusing {run_dir}")
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir.parent / f"{name}-{key}.overrides.json").write_text(json.dumps(overrides, indent=1))
    cmd = [str(Path(sys.executable).parent / "grow"), "run", *overrides, f"hydra.run.dir={run_dir}"]
    console.print(f"{name}: running into {run_dir}")
    t = time.time()
    with open(run_dir.parent / f"{name}-{key}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{name}: grow run failed (rc {rc}); see {run_dir.parent / f'{name}-{key}.log'}")
    console.print(f"{name}: done in {time.time() - t:.0f} s")
    return run_dir


def curve(run_dir: Path) -> dict:
    """Validation loss against cumulative FLOPs and elapsed seconds since the run began."""
    flops_at, t0, points = {}, None, []
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for r in recs:
        if "progress/flops" in r:
            flops_at[r["step"]] = r["progress/flops"]
            if t0 is None:  # the first step's own duration is in its tokens/s
                tokens = r["progress/tokens"]
                t0 = r["time"] - (tokens / r["perf/tokens_per_s"] if r.get("perf/tokens_per_s") else 0.0)
    for r in recs:
        if "val/loss" in r:
            points.append((flops_at[r["step"]], r["time"] - t0, r["val/loss"], r["step"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"flops": [p[0] for p in points], "wall_s": [p[1] for p in points], "val_loss": [p[2] for p in points],
            "step": [p[3] for p in points], "total_flops": summary["totals"]["flops"],
            "total_tokens": summary["totals"]["tokens"],
            "growth_checks": [s["growth"] for s in summary["stages"] if s.get("growth")]}


def crossing(c: dict, target: float) -> tuple[float | None, float | None]:
    """(FLOPs, seconds) at which the val-loss curve first reaches `target`, interpolated."""
    xs, ws, ys = c["flops"], c["wall_s"], c["val_loss"]
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return xs[0], ws[0]
            f = (ys[i - 1] - target) / (ys[i - 1] - y)
            return xs[i - 1] + f * (xs[i] - xs[i - 1]), ws[i - 1] + f * (ws[i] - ws[i - 1])
    return None, None


def plot(curves: dict, target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ax.plot(c["flops"], c["val_loss"], label=name, lw=2.2 if name == "scratch" else 1.4,
                color="black" if name == "scratch" else None)
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="scratch final val loss")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    lo = min(min(c["val_loss"]) for c in curves.values())
    ax.set_ylim(lo - 0.05, min(lo + 1.5, max(max(c["val_loss"]) for c in curves.values())))
    ax.set_title("growth vs scratch (embedded corpus)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--operators", default="msg,zero,clone,stack")
    p.add_argument("--tokens", type=int, help="scratch run's tokens T (default per size)")
    p.add_argument("--growth-tokens", type=float, default=1.25, help="growth schedules' tokens as a multiple of T")
    p.add_argument("--split", default="0.34,0.33,0.33", help="each stage's share of a growth schedule's tokens")
    p.add_argument("--peak-lr", type=float)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, help="warmup steps of the first stage / the scratch run")
    p.add_argument("--rewarm", type=int, default=10, help="LR re-warm steps after each growth")
    p.add_argument("--decay-in", choices=("each", "last"), default="last",
                   help="cosine decay in every stage, or only in the last (the others hold the peak)")
    p.add_argument("--ramp", type=int, default=20, help="msg mask ramp steps")
    p.add_argument("--layer-insert", default="interleave")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--threads", type=int, help="engine.threads (0: torch's default; default per size)")
    p.add_argument("--jobs", type=int, help="runs at a time (default per size; wall times then share the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "growth_vs_scratch"))
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    size = SIZES[a.size]
    for k in ("tokens", "batch", "seq", "peak_lr", "warmup", "eval_every", "eval_batches", "jobs", "threads"):
        if getattr(a, k) is None:
            setattr(a, k, size[k])
    work = Path(a.work_dir) / a.size
    work.mkdir(parents=True, exist_ok=True)
    runs = schedules(a)
    started = time.time()
    load_before = os.getloadavg()
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        dirs = dict(zip(runs, pool.map(lambda kv: run_one(kv[0], kv[1], work, True), runs.items())))
    curves = {name: curve(d) for name, d in dirs.items()}
    sc = curves["scratch"]
    target, scratch_flops, scratch_wall = sc["val_loss"][-1], sc["flops"][-1], sc["wall_s"][-1]
    result, rows = {}, []
    for name, c in curves.items():
        if name == "scratch":
            continue
        f, w = crossing(c, target)
        result[name] = {"flops_frac": None if f is None else f / scratch_flops,
                        "wall_frac": None if w is None else w / scratch_wall}
        rows.append([name, result[name]["flops_frac"], result[name]["wall_frac"], c["val_loss"][-1],
                     c["total_flops"] / scratch_flops, c["wall_s"][-1] / scratch_wall, c["total_tokens"]])
    rows.insert(0, ["scratch", 1.0, 1.0, target, 1.0, 1.0, sc["total_tokens"]])
    table(f"growth vs scratch ({a.size}): to reach the scratch final val loss {target:.4f}",
          ["schedule", "flops_frac", "wall_frac", "final val", "total FLOPs frac", "total wall frac", "tokens"], rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, target, out / "growth_vs_scratch.png")
    console.print(f"wrote {out / 'growth_vs_scratch.png'}")
    write_json("growth_vs_scratch.json", result, out)
    details = {"args": vars(a), "machine": machine(), "loadavg_at_start": [round(x, 2) for x in load_before],
               "elapsed_s": time.time() - started, "scratch": {"final_val_loss": target, "flops": scratch_flops,
                                                                "wall_s": scratch_wall},
               "overrides": runs, "curves": curves}
    write_json("growth_vs_scratch.details.json", details, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
