"""Growth vs training from scratch, through the real runner (`grow run`), against a tuned
scratch baseline and over seeds.

Every configuration - the scratch run (the final shape for T tokens) and one growth schedule
per operator, ending at the same shape - is tuned by the same sweep at seed 0: peak learning
rate (--sweep-lr, multiples of the size's base rate; widened by halving or doubling, up to
--sweep-extend times, while a configuration's best rate sits on the edge of those tried) x
first-stage warmup (--sweep-warmup). Scratch keeps the setting with the lowest final
validation loss; an operator keeps the one that reaches that scratch run's final loss with
the fewest FLOPs. The winners then run at --seeds seeds (seed 0 is the sweep's run). For
every seed, a growth run's `flops_frac` is the FLOPs at which its validation loss first
reaches the same seed's scratch final loss, over the scratch run's FLOPs (linear
interpolation between evaluations; null if never), and `wall_frac` the same in elapsed
seconds (steps, evaluations, checkpoints, growths). FLOPs do not depend on the machine's
load; wall times do (the load is recorded with them; --jobs runs share the CPU).

    python -m bench.growth_vs_scratch --lever-splits 0.2,0.2,0.6/0.34,0.33,0.33/0.5,0.25,0.25 \
        --lever-growth-tokens 1,1.25,1.5                       # small: ~40 runs, ~24 min on 2 idle cores
    python -m bench.growth_vs_scratch --size medium            # ~5M params after growth, ~60 min on 2 idle cores
    python -m bench.growth_vs_scratch --size large             # a GPU (engine.device=auto), one run at a time
    python -m bench.growth_vs_scratch --parametrization mup --peak-lr 6e-3   # with muP
    python -m bench.growth_vs_scratch --decay cosine --split 0.2,0.2,0.6     # other schedule levers

--lever-splits x --lever-growth-tokens probe the growth timing with the best operator at its
chosen rate (seed 0, against the tuned scratch run), and give for each split the schedule
cost at which the final loss equals scratch's, interpolated over the schedule lengths.

Schedules (3 stages each; --split gives each stage's share of the schedule's tokens - the
growth timing - and --growth-tokens the schedule's tokens as a multiple of T):
  msg, zero, clone: width x2 (hidden, ffn, heads; head_dim fixed), then depth x2;
  stack (grows depth only): depth x2, then x2 again at the final width.
--decay cosine: the earlier stages hold the peak after their (re-)warm and the last stage
decays (cosine) to --min-lr-frac x peak, as the scratch run does over its whole length;
--decay wsd: `lr.decay: wsd` in every stage and in the scratch run, a linear decay over the
last --decay-fraction of each run's tokens. Runs are cached in --work-dir by their overrides,
so a second call reuses finished runs. Writes bench/results/growth_vs_scratch.json (one entry
per size, every seed, the sweeps and the chosen settings), growth_vs_scratch.details.json
(curves) and growth_vs_scratch.png (val loss vs FLOPs, growth points marked, a panel per size);
with --parametrization mup, growth_vs_scratch.mup.{json,details.json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import RESULTS, console, machine, stage_literal, table
from bench.run_cache import CONDITIONS, cached_run

# shape = (layers, hidden, ffn, heads)
SIZES = {
    "small": dict(final=(4, 128, 352, 4), width_path=[(2, 64, 176, 2), (2, 128, 352, 4)],
                  depth_path=[(1, 128, 352, 4), (2, 128, 352, 4)], tokens=655360, batch=16, seq=128,
                  peak_lr=3e-3, warmup=30, eval_every=10, eval_batches=4, jobs=2, threads=1,
                  operators="msg,zero,clone,stack", sweep_lr="0.5,1,2"),
    # ~5.0M parameters at the end (head_dim 32); the sweep is as wide, over the operators that
    # preserve the function best at the small size and stack, to fit ~60 min on 2 idle cores
    "medium": dict(final=(4, 320, 864, 10), width_path=[(2, 160, 432, 5), (2, 320, 864, 10)],
                   depth_path=[(1, 320, 864, 10), (2, 320, 864, 10)], tokens=655360, batch=16, seq=128,
                   peak_lr=2e-3, warmup=30, eval_every=10, eval_batches=4, jobs=2, threads=1,
                   operators="msg,stack", sweep_lr="0.5,1,2"),
    "large": dict(final=(8, 512, 1408, 8), width_path=[(4, 256, 704, 4), (4, 512, 1408, 8)],
                  depth_path=[(2, 512, 1408, 8), (4, 512, 1408, 8)], tokens=52428800, batch=32, seq=256,
                  peak_lr=1e-3, warmup=200, eval_every=50, eval_batches=8, jobs=1, threads=0,
                  operators="msg,zero,stack", sweep_lr="0.5,1,2"),
}
DEFAULTS = ("tokens", "batch", "seq", "peak_lr", "warmup", "eval_every", "eval_batches", "jobs", "threads",
            "operators", "sweep_lr")


def whole_steps(tokens: float, a) -> int:
    step = a.batch * a.seq
    return max(1, int(round(tokens / step))) * step


def common_overrides(a, seed: int) -> list[str]:
    out = ["tracking=off", f"train.eval_every_steps={a.eval_every}", f"train.eval_batches={a.eval_batches}",
           "checkpoint.every_steps=1000000", f"seed={seed}"]
    if a.threads:
        out.append(f"engine.threads={a.threads}")
    if a.parametrization == "mup":  # the model's own muP (its own issue); base: the first stage's width
        base = SIZES[a.size]["width_path"][0][1]
        out += ["model.parametrization=mup", f"model.mup.base_hidden={a.mup_base_hidden or base}",
                f"model.mup.output_mult={a.mup_output_mult}"]
    return out


def overrides(a, name: str, peak: float, warmup: int, seed: int) -> list[str]:
    """The Hydra overrides of one `grow run`: `name` is "scratch" or an operator. The shapes
    are `a.shapes` when given (bench/growth_curve.py), else the size's."""
    size = getattr(a, "shapes", None) or SIZES[a.size]
    last_decay = "wsd" if a.decay == "wsd" else "cosine"
    held = "wsd" if a.decay == "wsd" else "constant"  # earlier stages: stable after the (re-)warm
    lit = dict(batch=a.batch, seq=a.seq, min_lr=peak * a.min_lr_frac, decay_fraction=a.decay_fraction)
    if name == "scratch":
        st = [stage_literal("final", size["final"], whole_steps(a.tokens, a), peak=peak, warmup=warmup,
                            decay=last_decay, **lit)]
        return common_overrides(a, seed) + ["schedule.name=scratch", "schedule.stages=[" + ",".join(st) + "]"]
    path = (size["depth_path"] if name == "stack" else size["width_path"]) + [size["final"]]
    split = [float(x) for x in a.split.split(",")]
    growth = {"operator": name, "ramp_steps": a.ramp if name == "msg" else 0,
              "layer_insert": "append" if name == "stack" else a.layer_insert}
    total = a.tokens * a.growth_tokens
    st = [stage_literal(f"s{i + 1}", shape, whole_steps(total * frac / sum(split), a), peak=peak,
                        warmup=warmup if i == 0 else a.rewarm, growth=None if i == 0 else growth,
                        decay=last_decay if i == len(path) - 1 else held, **lit)
          for i, (shape, frac) in enumerate(zip(path, split))]
    return common_overrides(a, seed) + [f"growth={name}", f"schedule.name=grow_{name}",
                                        "schedule.stages=[" + ",".join(st) + "]"]


def curve(run_dir: Path) -> dict:
    """Validation loss against cumulative FLOPs and elapsed seconds since the run began, and
    the FLOPs at which each growth happened."""
    flops_at, t0, points, growths, stage = {}, None, [], [], None
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for r in recs:
        if "progress/flops" in r:
            if stage is not None and r["stage"] != stage:
                growths.append(flops_at[r["step"] - 1])
            stage = r["stage"]
            flops_at[r["step"]] = r["progress/flops"]
            if t0 is None:  # the first step's own duration is in its tokens/s
                tokens = r["progress/tokens"]
                t0 = r["time"] - (tokens / r["perf/tokens_per_s"] if r.get("perf/tokens_per_s") else 0.0)
    for r in recs:
        if "val/loss" in r:
            points.append((flops_at[r["step"]], r["time"] - t0, r["val/loss"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    ran = run_dir / CONDITIONS
    return {"loadavg_1min_end": json.loads(ran.read_text())["loadavg_1_5_15_end"][0] if ran.exists() else None,
            "flops": [p[0] for p in points], "wall_s": [p[1] for p in points], "val_loss": [p[2] for p in points],
            "growth_flops": growths, "total_flops": summary["totals"]["flops"]}


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


def fractions(c: dict, scratch: dict) -> dict:
    """flops_frac and wall_frac of a growth curve against a scratch curve's final loss."""
    f, w = crossing(c, scratch["val_loss"][-1])
    return {"flops_frac": None if f is None else f / scratch["flops"][-1],
            "wall_frac": None if w is None else w / scratch["wall_s"][-1], "final_val_loss": c["val_loss"][-1]}


def spread(xs: list) -> dict:
    """Mean, sample standard deviation, min and max; None where any seed never got there."""
    if not xs or any(x is None for x in xs):
        return {"mean": None, "std": None, "min": None, "max": None, "reached": sum(x is not None for x in xs)}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs), "max": max(xs), "reached": len(xs)}


def rank(r: dict) -> tuple:
    """Sweep order for a growth setting: reached first, then fewer FLOPs, then lower final loss."""
    return (r["flops_frac"] is None, r["flops_frac"] or 0.0, r["final_val_loss"])


def run_all(jobs: int, todo: dict[tuple, list[str]], work: Path) -> dict[tuple, dict]:
    """Runs every (name, peak, warmup, seed) -> overrides at `jobs` at a time; their curves."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        dirs = dict(zip(todo, pool.map(lambda kv: cached_run(kv[0][0], kv[1], work, jobs), todo.items())))
    return {k: curve(d) for k, d in dirs.items()}


def tried_lrs(sweep: dict[tuple, dict], name: str) -> list[float]:
    return [k[1] for k in sweep if k[0] == name]


def next_lr(tried: list[float], best: float, base: list[float], limit: int) -> float | None:
    """The peak LR to try next when the best one sits on the edge of those tried: half the
    lowest or twice the highest, at most `limit` doublings beyond the base grid; None when the
    best is inside (the optimum is bracketed) or the limit is reached."""
    lo, hi = min(tried), max(tried)
    if best == lo and lo / 2 >= min(base) / 2 ** limit * (1 - 1e-9):
        return lo / 2
    if best == hi and hi * 2 <= max(base) * 2 ** limit * (1 + 1e-9):
        return hi * 2
    return None


def choose(runs: dict[tuple, dict], names: list[str]) -> tuple[dict, dict]:
    """Each configuration's chosen (peak LR, warmup) among its seed-0 runs, and the sweep rows:
    scratch by its final val loss, an operator by `rank` against the chosen scratch run."""
    def rows_of(name):
        return sorted((k[1], k[2]) for k in runs if k[0] == name and k[3] == 0)
    sweeps = {"scratch": [{"peak_lr": p, "warmup": w, "final_val_loss": runs["scratch", p, w, 0]["val_loss"][-1]}
                          for p, w in rows_of("scratch")]}
    best = min(sweeps["scratch"], key=lambda r: r["final_val_loss"])
    chosen = {"scratch": (best["peak_lr"], best["warmup"])}
    for op in names[1:]:
        sweeps[op] = [{"peak_lr": p, "warmup": w,
                       **fractions(runs[op, p, w, 0], runs["scratch", *chosen["scratch"], 0])}
                      for p, w in rows_of(op)]
        win = min(sweeps[op], key=rank)
        chosen[op] = (win["peak_lr"], win["warmup"])
    return chosen, sweeps


def bench(a) -> tuple[dict, dict]:
    """The sweep at seed 0 - widened while a configuration's best LR sits on the grid's edge -
    then the winners at every seed: (result, curves for the plot)."""
    work = Path(a.work_dir) / a.size
    work.mkdir(parents=True, exist_ok=True)
    names = ["scratch"] + a.operators.split(",")
    base = [a.peak_lr * float(m) for m in a.sweep_lr.split(",")]
    warmups = [int(w) for w in (a.sweep_warmup or str(a.warmup)).split(",")]
    sweep: dict[tuple, dict] = {}
    todo = {(n, p, w, 0): overrides(a, n, p, w, 0) for n in names for p in base for w in warmups}
    while todo:  # each round runs every configuration's next edge point side by side
        sweep.update(run_all(a.jobs, todo, work))
        chosen, sweeps = choose(sweep, names)
        todo = {}
        for n, (p, w) in chosen.items():
            nxt = next_lr(tried_lrs(sweep, n), p, base, a.sweep_extend)
            if nxt is not None:
                todo[n, nxt, w, 0] = overrides(a, n, nxt, w, 0)

    def bracketed(name):  # False: the best LR is still the edge of those tried (--sweep-extend ran out)
        tried = tried_lrs(sweep, name)
        return min(tried) < chosen[name][0] < max(tried)

    seeds = range(a.seeds)
    final = run_all(a.jobs, {(n, *chosen[n], s): overrides(a, n, *chosen[n], s) for n in names for s in seeds}, work)
    per_op = {}
    for op in names[1:]:
        runs = [{"seed": s, **fractions(final[op, *chosen[op], s], final["scratch", *chosen["scratch"], s])}
                for s in seeds]
        per_op[op] = {"peak_lr": chosen[op][0], "warmup": chosen[op][1], "lr_bracketed": bracketed(op), "seeds": runs,
                      "flops_frac": spread([r["flops_frac"] for r in runs]),
                      "wall_frac": spread([r["wall_frac"] for r in runs]),
                      "total_flops_frac": final[op, *chosen[op], 0]["total_flops"]
                      / final["scratch", *chosen["scratch"], 0]["total_flops"]}
    sc = [final["scratch", *chosen["scratch"], s] for s in seeds]
    loads = [c["loadavg_1min_end"] for c in final.values() if c["loadavg_1min_end"] is not None]
    result = {"scratch": {"peak_lr": chosen["scratch"][0], "warmup": chosen["scratch"][1],
                          "lr_bracketed": bracketed("scratch"),
                          "final_val_loss": [c["val_loss"][-1] for c in sc], "flops": sc[0]["flops"][-1],
                          "wall_s": [c["wall_s"][-1] for c in sc]},
              "operators": per_op, "sweeps": sweeps,
              # min and max over the runs in the table: cached runs may come from an earlier call
              "runs_loadavg_1min_end": [min(loads), max(loads)] if loads else None}
    if a.lever_splits or a.lever_growth_tokens:
        result["levers"] = levers(a, per_op, chosen, final["scratch", *chosen["scratch"], 0], work)
    curves = {n: final[n, *chosen[n], 0] for n in names}
    return result, curves


def levers(a, per_op: dict, chosen: dict, scratch: dict, work: Path) -> dict:
    """Growth timing probed at seed 0: the best operator at its chosen LR, every --lever-splits x
    --lever-growth-tokens combination, each measured against the tuned scratch run."""
    reached = {op: r["flops_frac"]["mean"] for op, r in per_op.items() if r["flops_frac"]["mean"] is not None}
    op = min(reached, key=reached.get) if reached else next(iter(per_op))
    splits = a.lever_splits.split("/") if a.lever_splits else [a.split]
    tokens = [float(t) for t in a.lever_growth_tokens.split(",")] if a.lever_growth_tokens else [a.growth_tokens]
    todo = {(op, split, t, 0): overrides(argparse.Namespace(**{**vars(a), "split": split, "growth_tokens": t}),
                                         op, *chosen[op], 0) for split in splits for t in tokens}
    runs = run_all(a.jobs, todo, work)
    rows = [{"split": split, "growth_tokens": t, **fractions(c, scratch),
             "total_flops_frac": c["total_flops"] / scratch["total_flops"]} for (_, split, t, _), c in runs.items()]
    budget = {split: budget_frac([r for r in rows if r["split"] == split], scratch["val_loss"][-1])
              for split in splits}
    return {"operator": op, "peak_lr": chosen[op][0], "warmup": chosen[op][1], "seed": 0, "rows": rows,
            "budget_flops_frac": budget}


def budget_frac(rows: list[dict], target: float) -> float | None:
    """The schedule cost (FLOPs over scratch's) at which the *final* val loss of one split's
    schedules of several lengths reaches `target`, interpolated between the two lengths that
    bracket it: every length decays at its own end, as the scratch run did, so this does not
    hinge on one run's decay landing just above or below the target. None if none brackets it."""
    pts = sorted((r["total_flops_frac"], r["final_val_loss"]) for r in rows)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 > target >= y1:
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    return pts[0][0] if pts and pts[0][1] <= target else None


COLORS = {"scratch": "black", "msg": "tab:blue", "zero": "tab:orange", "clone": "tab:green", "stack": "tab:red"}


def plot(panels: dict[str, dict], path: Path) -> None:
    """One panel per size: seed 0's val loss vs FLOPs of every chosen configuration, growths marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (size, curves) in zip(axes[0], panels.items()):
        target = curves["scratch"]["val_loss"][-1]
        for name, c in curves.items():
            line, = ax.plot(c["flops"], c["val_loss"], label=name, lw=2.2 if name == "scratch" else 1.4,
                            color=COLORS.get(name))
            for g in c["growth_flops"]:
                i = min(range(len(c["flops"])), key=lambda j: abs(c["flops"][j] - g))
                ax.plot([g], [c["val_loss"][i]], marker="o", ms=6, mfc="none", color=line.get_color())
        ax.axhline(target, color="gray", ls="--", lw=0.8, label="scratch final val loss")
        ax.set_xlabel("training FLOPs (o: growth)")
        ax.set_ylabel("validation loss")
        lo = min(min(c["val_loss"]) for c in curves.values())
        ax.set_ylim(lo - 0.05, lo + 1.2)
        ax.set_title(f"{size}: growth vs tuned scratch (seed 0)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--operators", help="comma-separated (default per size)")
    p.add_argument("--tokens", type=int, help="scratch run's tokens T (default per size)")
    p.add_argument("--growth-tokens", type=float, default=1.25, help="growth schedules' tokens as a multiple of T")
    p.add_argument("--split", default="0.34,0.33,0.33", help="each stage's share of a growth schedule's tokens")
    p.add_argument("--lever-splits", help="growth timing probes: splits separated by '/', e.g. 0.2,0.2,0.6/0.5,0.25,0.25")
    p.add_argument("--lever-growth-tokens", help="growth timing probes: schedule tokens as multiples of T, e.g. 1,1.25,1.5")
    p.add_argument("--peak-lr", type=float, help="base peak LR; the sweep multiplies it (default per size)")
    p.add_argument("--sweep-lr", help="multiples of --peak-lr swept for every configuration (default per size)")
    p.add_argument("--sweep-extend", type=int, default=2,
                   help="doublings (or halvings) of the LR beyond the grid tried while a best LR sits on its edge")
    p.add_argument("--sweep-warmup", help="first-stage warmups swept (default: --warmup alone)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, help="warmup steps of the first stage / the scratch run")
    p.add_argument("--rewarm", type=int, default=10, help="LR re-warm steps after each growth")
    p.add_argument("--decay", choices=("cosine", "wsd"), default="wsd",
                   help="cosine in the last stage only, or lr.decay=wsd everywhere (scratch too)")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: share of each run's tokens that decays")
    p.add_argument("--parametrization", choices=("standard", "mup"), default="standard")
    p.add_argument("--mup-base-hidden", type=int, help="muP base width (default: the first stage's hidden)")
    p.add_argument("--mup-output-mult", type=float, default=1.0)
    p.add_argument("--ramp", type=int, default=20, help="msg mask ramp steps")
    p.add_argument("--layer-insert", default="interleave")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--threads", type=int, help="engine.threads (0: torch's default; default per size)")
    p.add_argument("--jobs", type=int, help="runs at a time (default per size; wall times then share the CPU)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "growth_vs_scratch"))
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    for k in DEFAULTS:
        if getattr(a, k) is None:
            setattr(a, k, SIZES[a.size][k])
    return a


def main(argv=None) -> int:
    a = parse(argv)
    started, load_before = time.time(), os.getloadavg()
    result, curves = bench(a)
    load_after = os.getloadavg()
    sc = result["scratch"]
    rows = [["scratch", f"{sc['peak_lr']:.3g}/{sc['warmup']}", 1.0, None, 1.0, None,
             statistics.fmean(sc["final_val_loss"]), 1.0]]
    for op, r in result["operators"].items():
        f, w = r["flops_frac"], r["wall_frac"]
        rows.append([op, f"{r['peak_lr']:.3g}/{r['warmup']}", f["mean"], f["std"], w["mean"], w["std"],
                     statistics.fmean(s["final_val_loss"] for s in r["seeds"]), r["total_flops_frac"]])
    table(f"growth vs tuned scratch ({a.size}, {a.seeds} seeds, decay {a.decay}, split {a.split}, "
          f"{a.parametrization}): to reach each seed's scratch final val loss",
          ["schedule", "lr/warmup", "flops_frac", "+-", "wall_frac", "+-", "final val", "total FLOPs frac"], rows)
    if "levers" in result:
        lv = result["levers"]
        table(f"growth timing ({lv['operator']} at {lv['peak_lr']:.3g}, seed 0, against the tuned scratch run)",
              ["split", "tokens / T", "flops_frac", "final val", "total FLOPs frac"],
              [[r["split"], r["growth_tokens"], r["flops_frac"], r["final_val_loss"], r["total_flops_frac"]]
               for r in lv["rows"]])
        console.print("final val loss = scratch's, interpolated over the schedule's length (FLOPs frac): "
                      + ", ".join(f"{k}: {'-' if v is None else f'{v:.3f}'}" for k, v in lv["budget_flops_frac"].items()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result.update({"args": vars(a), "machine": machine(), "elapsed_s": round(time.time() - started, 1),
                   "loadavg_1_5_15_start": [round(x, 2) for x in load_before],
                   "loadavg_1_5_15_end": [round(x, 2) for x in load_after]})
    stem = "growth_vs_scratch" + (".mup" if a.parametrization == "mup" else "")
    merge_json(out / f"{stem}.json", a.size, result)
    details = merge_json(out / f"{stem}.details.json", a.size, {"curves": curves})
    plot({size: d["curves"] for size, d in details.items() if size in SIZES}, out / f"{stem}.png")
    console.print(f"wrote {out / f'{stem}.png'}")
    return 0


def merge_json(path: Path, size: str, entry: dict) -> dict:
    """The file's entry for `size` replaced (the other sizes' kept), written atomically."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data = {k: v for k, v in data.items() if k in SIZES}  # drops the old single-size layout
    data[size] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    console.print(f"wrote {path}")
    return data


if __name__ == "__main__":
    raise SystemExit(main())
