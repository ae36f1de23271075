"""Where growth pays: growth's saving against tokens per parameter, measured.

At each point (the final model's tokens per parameter of the scratch run, T / N) the
growth-vs-scratch measurement of bench/growth_vs_scratch.py runs at one small final size:
tuned scratch (the final shape, T tokens, wsd decay) against one growth schedule per
operator ending at that shape (1.25 T tokens, wsd in every stage). Scratch's and the --swept
operators' peak LRs are swept at seed 0 over --sweep-lr x --peak-lr and widened (halving or
doubling, up to --sweep-extend times) while the best rate sits on the edge of those tried;
the other operators run at the first swept one's (msg's) rate. `flops_frac`: the
FLOPs at which a growth run's validation loss first reaches the same seed's scratch final
loss, over scratch's FLOPs (null if never). The growth timing (the share of the schedule's
tokens before each growth) is probed with msg at its chosen rate over --splits, every seed
(scratch too); the split with the lowest mean is the point's figure ("best"). The other
operators are measured at seed 0, and the best preserving one there is recorded too.

What is done to fit a 2-core machine (all recorded in the JSON):
  * a final model of 61k parameters (4 layers x 32 hidden, ffn 88, 2 heads of 16; byte
    vocabulary, 10k embedding parameters), so 20 tokens per parameter are 1.2M tokens;
  * the batch (16 sequences of 128 tokens) halves at the shorter points until scratch takes
    >= 50 steps; warmup, re-warm, msg's mask ramp and the evaluation interval are fixed
    shares of scratch's steps (<= 30 evaluations of 4k-8k tokens a run);
  * LRs are swept at seed 0 only, for scratch, msg and stack; zero and clone run at msg's
    chosen rate (at the small size of growth_vs_scratch msg, zero and clone chose the same
    rate); the timing probe uses msg's rate tuned at the default split; seeds 1.. run for
    scratch and msg only (they run beside the unswept operators, in one round after the sweep);
  * all points run side by side, --jobs `grow run`s at a time, the longest point first (it
    sets the total time); finished runs are cached in --work-dir by their overrides
    (bench/run_cache.py), so a second call reuses them. No run is branched from another's
    checkpoint (WSD would allow it for scratch; not done).

FLOPs and losses do not depend on the machine's load (the load is recorded anyway).

    python -m bench.growth_curve --jobs 4                 # 5 points, 0.5-20 tokens/param: ~100 runs
    python -m bench.growth_curve --tpp 0.5,1,2,5,10,20    # a sixth point (~+60% of the time)
    python -m bench.growth_curve --tpp 0.5,2,20 --seeds 1  # a quick look

    python -m bench.growth_curve --partial-only           # runs nothing: adds what the cache holds for
                                                          # the points not finished (partial_points)

Writes bench/results/growth_curve.json (rewritten as each point finishes) and
growth_curve.png (flops_frac against tokens per parameter, the published anchors beside it).
`grow plan` reads the JSON (orchestrator/budget/growth_curve.py).
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import statistics
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import RESULTS, console, machine, table
from bench.growth_vs_scratch import (choose, curve, fractions, next_lr, overrides, rank, spread, tried_lrs,
                                     whole_steps)
from bench.run_cache import cached_run, run_dir_of

SHAPES = dict(final=(4, 32, 88, 2), width_path=[(2, 16, 44, 1), (2, 32, 88, 2)],
              depth_path=[(1, 32, 88, 2), (2, 32, 88, 2)])
PRESERVING = ("msg", "zero", "clone")  # stack copies layers: the function changes at the growth
# Published figures, for the plot and the README (FLOPs or compute to reach the baseline's loss, over its)
ANCHORS = [
    {"name": "G_stack (7B, 300B tokens)", "tokens_per_param": 43.0, "flops_frac": 0.65},
    {"name": "bert2BERT", "tokens_per_param": None, "flops_frac": 0.53},
    {"name": "Deep Progressive Training (muP, WSD)", "tokens_per_param": None, "flops_frac": 0.2},
]


class Gate:
    """At most `slots` runs at a time; a waiting run with a lower priority number goes first."""

    def __init__(self, slots: int):
        self.cv, self.free, self.queue, self.count = threading.Condition(), slots, [], itertools.count()

    def __call__(self, prio: float, fn, *args):
        me = (prio, next(self.count))
        with self.cv:
            heapq.heappush(self.queue, me)
            while not (self.free > 0 and self.queue[0] == me):
                self.cv.wait()
            heapq.heappop(self.queue)
            self.free -= 1
            self.cv.notify_all()
        try:
            return fn(*args)
        finally:
            with self.cv:
                self.free += 1
                self.cv.notify_all()


def final_params(a) -> int:
    from growth_ops.spec import count_parameters
    from bench.common import one_stage_config
    _, spec, _ = one_stage_config(SHAPES["final"], 16, a.seq, extra=["seed=0"])
    return count_parameters(spec)


def point_args(a, tpp: float, params: int) -> argparse.Namespace:
    """The growth_vs_scratch arguments of one point: its tokens, batch and step-based settings."""
    tokens = tpp * params
    batch = a.max_batch
    while batch > 1 and tokens / (batch * a.seq) < a.min_steps:
        batch //= 2
    p = argparse.Namespace(**{**vars(a), "batch": batch, "shapes": SHAPES})
    p.tokens = whole_steps(tokens, p)
    steps = p.tokens // (batch * a.seq)
    p.warmup = max(3, round(a.warmup_frac * steps))
    p.rewarm = max(2, round(a.rewarm_frac * steps))
    p.ramp = max(2, round(a.ramp_frac * steps))
    p.eval_every = max(2, steps // a.evals)
    p.eval_batches = max(1, a.eval_tokens // (batch * a.seq))
    p.steps = steps
    return p


def with_split(p, split: str):
    return argparse.Namespace(**{**vars(p), "split": split})


class Point:
    """One tokens-per-parameter point, measured in phases; its runs go through the gate."""

    def __init__(self, a, tpp: float, params: int, gate: Gate, prio: float):
        self.a, self.tpp, self.params, self.gate, self.prio = a, tpp, params, gate, prio
        self.p = point_args(a, tpp, params)
        self.work = Path(a.work_dir) / f"tpp{tpp:g}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.loads: list[float] = []
        self.runs = 0

    def run(self, todo: dict[tuple, list[str]]) -> dict[tuple, dict]:
        def one(kv):
            d = self.gate(self.prio, cached_run, kv[0][0], kv[1], self.work, self.a.jobs)
            return curve(d)
        with ThreadPoolExecutor(max(1, len(todo))) as pool:
            out = dict(zip(todo, pool.map(one, todo.items())))
        self.runs += len(out)
        self.loads += [c["loadavg_1min_end"] for c in out.values() if c["loadavg_1min_end"] is not None]
        return out

    def measure(self) -> dict:
        a, p, started = self.a, self.p, time.time()
        every = a.operators.split(",")
        swept = [o for o in a.swept.split(",") if o in every]
        names, w, seeds = ["scratch"] + swept, p.warmup, range(a.seeds)
        base = [a.peak_lr * float(m) for m in a.sweep_lr.split(",")]
        sweep: dict[tuple, dict] = {}
        todo = {(n, lr, w, 0): overrides(p, n, lr, w, 0) for n in names for lr in base}
        while todo:  # every swept configuration's next edge point side by side
            sweep.update(self.run(todo))
            chosen, sweeps = choose(sweep, names)
            todo = {}
            for n, (lr, _) in chosen.items():
                nxt = next_lr(tried_lrs(sweep, n), lr, base, a.sweep_extend)
                if nxt is not None:
                    todo[n, nxt, w, 0] = overrides(p, n, nxt, w, 0)
        # the unswept operators at the rate of the first swept one (msg: the same optimum as zero and
        # clone at the small size of growth_vs_scratch); scratch's other seeds; and the growth
        # timing, probed with that operator at every split and seed - all side by side, one round
        lead = swept[0]
        for op in every:
            chosen.setdefault(op, chosen[lead])
        splits = [a.split] + [s for s in a.splits.split("/") if s != a.split]

        def key(op, s, split):
            return (op, *chosen[op], s) if split == a.split else (op, *chosen[op], s, split)
        todo = {(op, *chosen[op], 0): overrides(p, op, *chosen[op], 0) for op in every if op not in swept}
        todo.update({("scratch", *chosen["scratch"], s): overrides(p, "scratch", *chosen["scratch"], s)
                     for s in seeds if s > 0})
        todo.update({key(lead, s, split): overrides(with_split(p, split), lead, *chosen[lead], s)
                     for split in splits for s in seeds if (s, split) != (0, a.split)})
        runs = {**{k: v for k, v in sweep.items() if (k[0], *k[1:3]) in {(n, *chosen[n]) for n in names}},
                **self.run(todo)}
        scratch = {s: runs["scratch", *chosen["scratch"], s] for s in seeds}
        rows0 = {op: fractions(runs[op, *chosen[op], 0], scratch[0]) for op in every}
        best0 = min((op for op in every if op in PRESERVING), key=lambda op: rank(rows0[op]))
        by_split = {split: [{"seed": s, **fractions(runs[key(lead, s, split)], scratch[s])} for s in seeds]
                    for split in splits}

        def mean_rank(split):  # more seeds reaching scratch first, then fewer FLOPs, then lower final loss
            rows = by_split[split]
            fr = [r["flops_frac"] for r in rows if r["flops_frac"] is not None]
            return (len(rows) - len(fr), statistics.fmean(fr) if fr else 0.0,
                    statistics.fmean(r["final_val_loss"] for r in rows))
        best_split = min(splits, key=mean_rank)
        timing = [{"split": split, "seed0": by_split[split][0], "seeds": by_split[split],
                   "flops_frac": spread([r["flops_frac"] for r in by_split[split]])} for split in splits]
        best_rows = by_split[best_split]

        operators = {}
        for op in every:
            rows = by_split[a.split] if op == lead else [{"seed": 0, **rows0[op]}]
            tried = sorted(tried_lrs(sweep, op)) if op in swept else None
            operators[op] = {"peak_lr": chosen[op][0], "lr_swept": op in swept, "lrs_tried": tried,
                             "lr_bracketed": tried[0] < chosen[op][0] < tried[-1] if tried else None,
                             "lr_from": None if op in swept else lead,
                             "split": a.split, "seeds": rows, "flops_frac": spread([x["flops_frac"] for x in rows]),
                             "total_flops_frac": runs[op, *chosen[op], 0]["total_flops"] / scratch[0]["total_flops"]}
        tried = tried_lrs(sweep, "scratch")
        return {
            "tokens_per_param": self.tpp, "tokens": p.tokens, "params": self.params, "batch": p.batch,
            "seq": p.seq, "steps": p.steps, "warmup": p.warmup, "rewarm": p.rewarm, "msg_ramp": p.ramp,
            "eval_every": p.eval_every, "eval_batches": p.eval_batches,
            "scratch": {"peak_lr": chosen["scratch"][0], "lrs_tried": sorted(tried),
                        "lr_bracketed": min(tried) < chosen["scratch"][0] < max(tried),
                        "final_val_loss": [scratch[s]["val_loss"][-1] for s in seeds],
                        "flops": scratch[0]["flops"][-1]},
            "operators": operators,
            "timing": {"operator": lead, "peak_lr": chosen[lead][0], "seeds": list(seeds), "rows": timing,
                       "best_split": best_split},
            "best_preserving_seed0": {"operator": best0, "split": a.split, **rows0[best0]},
            "best": {"operator": lead, "split": best_split, "seeds": best_rows,
                     "flops_frac": spread([x["flops_frac"] for x in best_rows])},
            "sweeps": sweeps, "runs": self.runs,
            "runs_loadavg_1min_end": [min(self.loads), max(self.loads)] if self.loads else None,
            "elapsed_s": round(time.time() - started, 1)}


def summary_rows(points: list[dict]) -> list[list]:
    rows = []
    for pt in points:
        ff = {op: r["flops_frac"]["mean"] for op, r in pt["operators"].items()}
        b = pt["best"]
        rows.append([pt["tokens_per_param"], pt["tokens"], pt["batch"], ff.get("msg"), ff.get("zero"),
                     ff.get("clone"), ff.get("stack"), f"{b['operator']} {b['split']}", b["flops_frac"]["mean"],
                     b["flops_frac"]["std"], pt["runs_loadavg_1min_end"] and pt["runs_loadavg_1min_end"][1]])
    return rows


COLORS = {"msg": "tab:blue", "zero": "tab:orange", "clone": "tab:green", "stack": "tab:red"}
SHIFT = {"msg": 0.93, "zero": 0.98, "clone": 1.03, "stack": 1.08}  # side by side at a point (log x)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = result["points"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for op, color in COLORS.items():
        xs = [(p["tokens_per_param"], p["operators"][op]["flops_frac"]) for p in pts if op in p["operators"]
              and p["operators"][op]["flops_frac"]["mean"] is not None]
        if xs:
            ax.errorbar([x for x, _ in xs], [f["mean"] for _, f in xs], yerr=[f["std"] or 0 for _, f in xs],
                        color=color, marker="o", ms=4, lw=1.0, capsize=2)
        seeded = pts and pts[0]["timing"]["operator"] == op  # the timing probe's operator ran every seed
        ax.plot([], [], color=color, marker="o", ms=4,
                label=f"{op} ({'seeds mean' if seeded else 'seed 0'}, split {result['split']})")
    best = [(p["tokens_per_param"], p["best"]["flops_frac"]) for p in pts if p["best"]["flops_frac"]["mean"] is not None]
    if best:
        ax.errorbar([x for x, _ in best], [f["mean"] for _, f in best], yerr=[f["std"] or 0 for _, f in best],
                    color="black", marker="s", ms=6, lw=2.0, capsize=3, label="best preserving, best timing")
    for op, color in COLORS.items():  # x at the top: never reached scratch's final loss
        xs = [p["tokens_per_param"] for p in pts if op in p["operators"] and p["operators"][op]["flops_frac"]["mean"] is None]
        ax.plot([x * SHIFT[op] for x in xs], [1.1] * len(xs), marker="x", ms=7, color=color, ls="none")
    xs = [p["tokens_per_param"] for p in pts if p["best"]["flops_frac"]["mean"] is None]
    ax.plot(xs, [1.12] * len(xs), marker="x", ms=9, color="black", ls="none")
    hollow = False
    for pp in result.get("partial_points", []):  # stopped for time: seed 0, the best rate and split so far
        for op, color in COLORS.items():
            vals = [r["flops_frac"] for r in pp["runs"] if r["name"] == op and r["seed"] == 0
                    and r.get("flops_frac") is not None]
            tried = any(r["name"] == op for r in pp["runs"])
            if vals or tried:
                ax.plot([pp["tokens_per_param"] * SHIFT[op]], [min(vals) if vals else 1.1], marker="o" if vals else "x",
                        mfc="none", ms=7, color=color, ls="none",
                        label=None if hollow else "hollow: a point stopped for time (seed 0, best so far)")
                hollow = True
    ax.text(0.99, 1.14, "x: never reached scratch's loss", fontsize=7, ha="right",
            transform=ax.get_yaxis_transform())
    for an in ANCHORS:
        if an["tokens_per_param"]:
            ax.plot([an["tokens_per_param"]], [an["flops_frac"]], marker="*", ms=12, color="purple", ls="none")
            ax.annotate(an["name"], (an["tokens_per_param"], an["flops_frac"]), textcoords="offset points",
                        xytext=(-100, -16), fontsize=7)
        else:
            ax.axhline(an["flops_frac"], color="purple", ls=":", lw=0.8)
            ax.text(0.01, an["flops_frac"] + 0.01, an["name"], fontsize=7, color="purple",
                    transform=ax.get_yaxis_transform())  # x in axes fraction: no tokens/param given
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(0.45, color="gray", ls="--", lw=0.8, label="aim 0.45")
    ax.set_xscale("log")
    ax.set_xlim(0.3, 70)
    ax.set_ylim(0.0, 1.2)
    ax.set_xlabel(f"tokens per parameter of the final model ({result['params'] / 1e3:.0f}k params)")
    ax.set_ylabel("flops_frac (FLOPs to scratch's final loss / scratch's)")
    ax.set_title("Where growth pays (tuned LRs, wsd; operators seed 0, best: seeds' mean)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def partial_point(a, tpp: float, params: int) -> dict | None:
    """What the run cache holds for a point that did not finish (stopped for time): every
    finished seed-0 run of the LR sweep and msg's timing probe, each growth run against the
    best scratch run there. No figure here is tuned to the end or averaged over seeds."""
    p = point_args(a, tpp, params)
    work = Path(a.work_dir) / f"tpp{tpp:g}"
    base = [a.peak_lr * float(m) for m in a.sweep_lr.split(",")]
    lrs = sorted({lr * 2.0 ** k for lr in base for k in range(-a.sweep_extend, a.sweep_extend + 1)})
    splits = [a.split] + [s for s in a.splits.split("/") if s != a.split]
    found = {}
    for name in ["scratch"] + a.operators.split(","):
        for lr in lrs:
            for split in (splits if name != "scratch" else [a.split]):
                for seed in range(a.seeds):
                    d = run_dir_of(name, overrides(with_split(p, split), name, lr, p.warmup, seed), work)
                    summary = d / "summary.json"
                    if summary.exists() and json.loads(summary.read_text())["status"] == "complete":
                        found[name, lr, split, seed] = curve(d)
    sc = {k: c for k, c in found.items() if k[0] == "scratch" and k[3] == 0}
    if not sc:
        return None
    best = min(sc, key=lambda k: sc[k]["val_loss"][-1])
    runs = [{"name": k[0], "peak_lr": k[1], "split": k[2], "seed": k[3],
             **({"final_val_loss": c["val_loss"][-1]} if k[0] == "scratch" else
                fractions(c, found[best] if k[3] == 0 else found.get(("scratch", best[1], a.split, k[3]), found[best])))}
            for k, c in sorted(found.items())]
    loads = [c["loadavg_1min_end"] for c in found.values() if c["loadavg_1min_end"] is not None]
    return {"tokens_per_param": tpp, "complete": False, "tokens": p.tokens, "params": params, "batch": p.batch,
            "steps": p.steps, "scratch_best": {"peak_lr": best[1], "final_val_loss": sc[best]["val_loss"][-1],
                                               "lrs_tried": sorted(k[1] for k in sc)},
            "runs": runs, "runs_loadavg_1min_end": [min(loads), max(loads)] if loads else None}


def add_partial(a, path: Path) -> dict:
    """The results file with `partial_points` for every --tpp point it lacks."""
    result = json.loads(path.read_text()) if path.exists() else {"points": [], "split": a.split}
    params = result.setdefault("params", final_params(a))
    result.setdefault("split", a.split)
    done = {p["tokens_per_param"] for p in result.get("points", [])}
    result["partial_points"] = [pt for tpp in (float(x) for x in a.tpp.split(",")) if tpp not in done
                                for pt in [partial_point(a, tpp, params)] if pt]
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tpp", default="0.5,1,2,5,20", help="tokens per parameter of the scratch run")
    p.add_argument("--priority", default="20,0.5,5,2,1",
                   help="the order in which points get the CPU (points not listed go last)")
    p.add_argument("--operators", default="msg,zero,stack,clone")
    p.add_argument("--swept", default="msg,stack",
                   help="operators whose LR is swept; the others run at the first one's chosen rate")
    p.add_argument("--peak-lr", type=float, default=4e-3)
    p.add_argument("--sweep-lr", default="0.5,1,2")
    p.add_argument("--sweep-extend", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--split", default="0.34,0.33,0.33", help="the growth timing every operator runs at")
    p.add_argument("--splits", default="0.2,0.2,0.6/0.34,0.33,0.33/0.5,0.25,0.25",
                   help="the timings probed with the best preserving operator, separated by '/'")
    p.add_argument("--growth-tokens", type=float, default=1.25, help="growth schedules' tokens as a multiple of T")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--min-steps", type=int, default=50, help="the batch halves until scratch has this many steps")
    p.add_argument("--warmup-frac", type=float, default=0.1, help="first-stage warmup, share of scratch's steps")
    p.add_argument("--rewarm-frac", type=float, default=0.03, help="re-warm after a growth, share of scratch's steps")
    p.add_argument("--ramp-frac", type=float, default=0.06, help="msg mask ramp, share of scratch's steps")
    p.add_argument("--evals", type=int, default=30, help="evaluations over the scratch run")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens per evaluation (at least one batch)")
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "growth_curve"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--partial-only", action="store_true",
                   help="run nothing: add what the run cache holds for the points the results file lacks "
                        "(partial_points) and redraw the plot")
    p.add_argument("--code-commit", help="recorded with the results: the commit of the code the runs used "
                                        "(e.g. when run from `git archive` of it, with PYTHONPATH set to it)")
    a = p.parse_args(argv)
    # what growth_vs_scratch.overrides reads beside the point's own settings
    a.decay, a.parametrization, a.layer_insert, a.size = "wsd", "standard", "interleave", "curve"
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.partial_only:
        path = Path(a.out) / "growth_curve.json"
        result = add_partial(a, path)
        path.write_text(json.dumps(result, indent=1, default=float) + "\n")
        if result.get("points") or result.get("partial_points"):
            plot(result, Path(a.out) / "growth_curve.png")
        console.print(f"wrote {path}: {len(result['partial_points'])} partial points")
        return 0
    started, load_before = time.time(), os.getloadavg()
    params = final_params(a)
    order = [float(x) for x in a.priority.split(",")]
    gate, lock, points, failed = Gate(a.jobs), threading.Lock(), {}, {}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"params": params, "shape": dict(zip(("layers", "hidden", "ffn", "heads"), SHAPES["final"])),
              "width_path": SHAPES["width_path"], "depth_path": SHAPES["depth_path"], "split": a.split,
              "definition": "tokens_per_param: scratch's tokens over the final model's parameters (all, embeddings "
                            "included, as grow plan counts them); flops_frac: FLOPs at which a growth run's val loss "
                            "first reaches the same seed's tuned-scratch final val loss, over scratch's FLOPs; "
                            "growth schedules train 1.25x scratch's tokens, wsd decay everywhere",
              "anchors": ANCHORS}

    def write():
        result.update({"points": sorted(points.values(), key=lambda p: p["tokens_per_param"]),
                       "failed": failed, "args": {k: v for k, v in vars(a).items()}, "machine": machine(),
                       "elapsed_s": round(time.time() - started, 1),
                       "loadavg_1_5_15_start": [round(x, 2) for x in load_before],
                       "loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()]})
        loads = [x for p in points.values() if p["runs_loadavg_1min_end"] for x in p["runs_loadavg_1min_end"]]
        result["runs_loadavg_1min_end"] = [min(loads), max(loads)] if loads else None
        tmp = out / "growth_curve.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
        os.replace(tmp, out / "growth_curve.json")
        if result["points"]:
            plot(result, out / "growth_curve.png")

    def measure(tpp):
        prio = order.index(tpp) if tpp in order else len(order) + tpp
        try:
            pt = Point(a, tpp, params, gate, prio).measure()
        except BaseException as e:  # one point's failure leaves the others running
            with lock:
                failed[f"{tpp:g}"] = f"{type(e).__name__}: {e}"
                console.print(traceback.format_exc())
            return
        with lock:
            points[tpp] = pt
            write()
            console.print(f"point {tpp:g} tokens/param done in {pt['elapsed_s']:.0f} s ({pt['runs']} runs)")

    tpps = [float(x) for x in a.tpp.split(",")]
    with ThreadPoolExecutor(len(tpps)) as pool:
        list(pool.map(measure, tpps))
    with lock:
        write()
    table(f"where growth pays ({params / 1e3:.0f}k params, {a.seeds} seeds, wsd; flops_frac mean over seeds)",
          ["tokens/param", "tokens", "batch", "msg", "zero", "clone", "stack", "best (op, split)", "best",
           "+-", "max load"], summary_rows(result["points"]))
    if failed:
        console.print(f"failed points: {failed}")
    console.print(f"wrote {out / 'growth_curve.json'} and growth_curve.png")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
