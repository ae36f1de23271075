"""Loss prediction from proxies (FLM-101B), through the code of `grow predict`.

Trains one-stage proxies of several widths (same depth, head size, ffn ratio) on the same
tokens of the embedded text, plus one model --wide-factor x wider than the largest proxy on
the same tokens, every one a real `grow run` member of a Hydra sweep (tracking off); each
proxy at --seeds seeds, its mean loss fitted (training noise at these sizes is a few 0.01). Fits
L(N) = a*N^b + c (N: non-embedding parameters) to the proxies and reports
  - held_out_rel_error: the largest proxy held out (the law fitted to the smaller ones)
  - wide_rel_error: the law fitted to all proxies, on the wide model it never saw.
Writes bench/results/loss_prediction.json and loss_prediction.png (muP: loss_prediction.mup.*).

    nice python -m bench.loss_prediction                         # CPU, ~10-15 min on 2 loaded cores
    python -m bench.loss_prediction --parametrization mup         # muP proxies (once muP exists)
    python -m bench.loss_prediction --widths 64,96,128,192 --tokens 1048576   # a GPU

A finished sweep in --work-dir is reused (the members resume as finished runs).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import RESULTS, console, machine, table, write_json
from orchestrator.commands.compose import CommandLine, load
from orchestrator.commands.predict import points_of, proxy_shapes, shape_sweep
from orchestrator.budget.loss_law import LAW, PowerLaw, fit_with_held_out, plot_fit, relative_error
from orchestrator.commands.sweeps import finished_members, run_sweep


def sweep_points(cfg, overrides: list[str], shapes: list[dict], directory: Path) -> list[dict]:
    """Run (or reuse) one sweep over `shapes`; each member's width, N and final val loss."""
    status = run_sweep(overrides + [shape_sweep(shapes), f"hydra.sweep.dir={directory}"])
    members, finished = finished_members(directory)
    if status or len(finished) != len(members) or not finished:
        sys.exit(f"the sweep in {directory} did not finish (status {status}): {[m['status'] for m in members]}")
    return points_of(cfg, finished)


def mean_per_width(points: list[dict]) -> list[dict]:
    by_width: dict[int, list[dict]] = {}
    for p in points:
        by_width.setdefault(p["width"], []).append(p)
    return [{"width": w, "n": ps[0]["n"], "loss": sum(p["loss"] for p in ps) / len(ps),
             "seed_losses": [p["loss"] for p in ps]} for w, ps in sorted(by_width.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="16,24,32,48", help="proxy widths (>= 4: one is held out)")
    ap.add_argument("--wide-factor", type=int, default=4, help="the unseen model: this x the largest width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=524288, help="training tokens of every model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=64, help="final val loss over this many batches")
    ap.add_argument("--seeds", default="0,1,2",
                    help="each proxy at these seeds (mean loss fitted); the wide model at the first")
    ap.add_argument("--parametrization", default="standard", choices=("standard", "mup"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run; on a loaded CPU 2 threads ran 100x slower than 1 (spinning)")
    ap.add_argument("--work-dir", default="/tmp/grow-bench-loss-prediction")
    args = ap.parse_args()

    widths = sorted(int(w) for w in args.widths.split(","))
    wide = widths[-1] * args.wide_factor
    base = widths[0]
    overrides = ["schedule=proxy", "tracking=off", f"engine.threads={args.threads}",
                 f"schedule.stages.0.shape={{layers:{args.layers},hidden:{base},ffn:{4 * base},"
                 f"heads:{base // args.head_dim},kv_heads:null}}",
                 f"schedule.stages.0.tokens={args.tokens}", f"schedule.stages.0.batch_size={args.batch}",
                 f"schedule.stages.0.seq_len={args.seq}", f"schedule.stages.0.lr.peak={args.lr}",
                 f"schedule.stages.0.lr.min={args.lr / 10}", "schedule.stages.0.lr.warmup_steps=16",
                 f"train.eval_batches={args.eval_batches}", "train.eval_every_steps=1000000",
                 "checkpoint.every_steps=1000000"]
    if args.parametrization == "mup":  # the proxies' base shape is the smallest width
        overrides += ["model.parametrization=mup", f"model.mup.base_hidden={base}"]
    cfg = load(CommandLine(overrides), planning=True)
    seeds = args.seeds.split(",")
    work = Path(args.work_dir) / f"{args.parametrization}-{args.tokens}"
    t0 = time.time()
    # the proxies at every seed (their mean loss per width is fitted), the wide model at the first
    proxies = sweep_points(cfg, overrides + [f"seed={','.join(seeds)}"], proxy_shapes(cfg, widths),
                           work / f"proxies-{'-'.join(map(str, widths))}-seeds-{'-'.join(seeds)}")
    wide_point = sweep_points(cfg, overrides + [f"seed={seeds[0]}"], proxy_shapes(cfg, [wide]),
                              work / f"width-{wide}-seed-{seeds[0]}")[0]
    fit = fit_with_held_out(mean_per_width(proxies))
    law = PowerLaw(fit["a"], fit["b"], fit["c"])
    predicted_wide = law(wide_point["n"])
    held = fit["held_out"]
    result = {
        "law": LAW, "n": fit["n"], "a": fit["a"], "b": fit["b"], "c": fit["c"],
        "parametrization": args.parametrization, "tokens": wide_point["tokens"], "widths": widths,
        "points": fit["points"], "held_out_width": held["width"], "held_out_loss": held["loss"],
        "held_out_predicted": held["predicted"], "held_out_rel_error": held["rel_error"],
        "wide_width": wide, "wide_n": wide_point["n"], "wide_loss": wide_point["loss"],
        "wide_predicted": predicted_wide, "wide_rel_error": relative_error(predicted_wide, wide_point["loss"]),
        "settings": vars(args), "work_dir": str(work), "wall_s": round(time.time() - t0, 1),
        "machine": machine(),
    }
    rows = [[f"proxy {p['width']}", p["n"], p["loss"], law(p["n"]), None] for p in fit["points"]]
    rows[-1][-1] = f"held out: fitted without it {held['predicted']:.4f} ({100 * held['rel_error']:.2f}%)"
    rows.append([f"wide {wide} (unseen)", wide_point["n"], wide_point["loss"], predicted_wide,
                 f"{100 * result['wide_rel_error']:.2f}%"])
    table(f"{LAW}: a={fit['a']:.4g} b={fit['b']:.4f} c={fit['c']:.4f}, {result['tokens']:,} tokens each",
          ["model", "N (non-embedding)", "val loss", "fit (all proxies)", "note"], rows)
    name = "loss_prediction" if args.parametrization == "standard" else f"loss_prediction.{args.parametrization}"
    write_json(f"{name}.json", result)
    plot = plot_fit(fit, RESULTS / f"{name}.png",
                    extra=[{"n": wide_point["n"], "loss": wide_point["loss"],
                            "label": f"{args.wide_factor}x wider, unseen "
                                     f"(error {100 * result['wide_rel_error']:.2f}%)"}],
                    title=f"{LAW}, {args.parametrization}, {result['tokens']:,} tokens each")
    console.print(f"wrote {plot}")


if __name__ == "__main__":
    main()
