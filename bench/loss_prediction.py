"""Loss prediction far from the proxies (FLM-101B's flow: search, transfer, predict, train),
through `grow search`, `grow predict` and `grow run`.

1. search: `grow search search.space=lr_init` on the proxy at --search-width and the grid's
   smallest token count; its winner (peak LR, init std) is carried to every run below.
2. predict: one `grow predict` sweep over the grid --widths x --tokens x --seeds (a cosine
   run per point: a WSD branch per token count would need resuming a stable run under a new
   schedule, which `grow run` does not do); L(N, D) = E + A/N^alpha + B/D^beta fitted with
   bootstrap intervals (orchestrator/budget/law_fit.py); kept even when it is not a law
   (predict.keep_unlawful=true), so the bench can report why; the same points fitted again in
   Kaplan et al.'s form (predict.form=kaplan: no irreducible term) in this process.
3. train the held-out targets, none seen by the fit: 4x and 8x the widest proxy's
   non-embedding parameters at its largest token count, the widest proxy at 4x those
   tokens, and a 3-stage grown schedule (widest proxy -> 4x -> 8x, msg, --grown-split of
   --grown-tokens x the tokens); --far adds the 8x model at 4x the tokens.
4. the grown-schedule correction: two small 3-stage schedules (the target's widths scaled
   down to the smallest proxy) at the grid's token counts; their mean relative gap to the
   law's carry-over prediction corrects the target's (orchestrator/budget/grown.py).
Reports each target's predicted loss with its 95% interval, the measured loss and the
relative error, the parameters with intervals, and the grid's cost (FLOPs, all seeds) as a
fraction of the targets'. Losses and FLOPs do not depend on the machine's load (the load is
recorded all the same). Writes bench/results/loss_prediction[.mup].json and .png.

    nice -n 5 python -m bench.loss_prediction                        # standard, ~30-40 min on 2 loaded cores
    nice -n 5 python -m bench.loss_prediction --parametrization mup
    python -m bench.loss_prediction --runs-only                     # train everything, fit later

Every run is reused from --work-dir on a second call (the sweeps' members and cached runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, RESULTS, console, machine, stage_literal, table, write_json
from bench.run_cache import cached_run, run_dir_of

GROW = str(Path(sys.executable).parent / "grow")


def shape(width: int, layers: int, head_dim: int) -> tuple[int, int, int, int]:
    return (layers, width, 4 * width, width // head_dim)


def common(a, seed: int | None = None) -> list[str]:
    out = ["schedule=proxy", "tracking=off", f"engine.threads={a.threads}", f"train.eval_batches={a.eval_batches}",
           "train.eval_every_steps=1000000", "checkpoint.every_steps=1000000"]
    if a.parametrization == "mup":  # the proxies' base shape is the smallest width
        out += ["model.parametrization=mup", f"model.mup.base_hidden={a.widths[0]}"]
    return out + ([f"seed={seed}"] if seed is not None else [])


def one_stage(a, width: int, tokens: int, lr: float) -> list[str]:
    """The proxy stage at `width` and `tokens`, as overrides of schedule=proxy."""
    layers, hidden, ffn, heads = shape(width, a.layers, a.head_dim)
    return [f"schedule.stages.0.shape={{layers:{layers},hidden:{hidden},ffn:{ffn},heads:{heads},kv_heads:null}}",
            f"schedule.stages.0.tokens={tokens}", f"schedule.stages.0.batch_size={a.batch}",
            f"schedule.stages.0.seq_len={a.seq}", f"schedule.stages.0.lr.peak={lr}",
            f"schedule.stages.0.lr.min={lr / 10:.6g}", f"schedule.stages.0.lr.warmup_steps={a.warmup}"]


def grown(a, widths: list[int], tokens: list[int], lr: float) -> list[str]:
    """A 3-stage width-grown schedule (msg): the earlier stages hold the peak after their
    (re-)warm, the last decays (cosine) to peak/10 as a run from scratch does."""
    stages = [stage_literal(f"s{i + 1}", shape(w, a.layers, a.head_dim), d, a.batch, a.seq, lr,
                            a.warmup, lr / 10, growth=None if i == 0 else {"operator": "msg", "ramp_steps": a.ramp},
                            decay="cosine" if i == len(widths) - 1 else "constant")
              for i, (w, d) in enumerate(zip(widths, tokens))]
    return ["growth=msg", "schedule.name=grown", "schedule.stages=[" + ",".join(stages) + "]"]


def grow(args: list[str], log: Path) -> int:
    with open(log, "w") as f:
        return subprocess.run([GROW, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode


def search(a, work: Path) -> dict:
    """`grow search` on the proxy: the winner's values (reused when its search.json exists)."""
    directory = work / "search"
    if not (directory / "search.json").exists():
        args = ["search", "search.space=lr_init", *common(a), *one_stage(a, a.search_width, a.tokens[0], 3e-3),
                f"hydra.sweep.dir={directory}"]
        rc = grow(args, work / "search.log")
        if rc:
            sys.exit(f"grow search failed (rc {rc}); see {work / 'search.log'}")
    report = json.loads((directory / "search.json").read_text())
    swept = report["winner"]["swept"]
    return {"lr": float(swept["schedule.stages.0.lr.peak"]), "init_std": float(swept["model.init_std"]),
            "final_val_loss": report["winner"]["final_val_loss"], "members": len(report["members"])}


def grid_overrides(a, chosen: dict) -> list[str]:
    return [*common(a), *one_stage(a, a.widths[0], a.tokens[0], chosen["lr"]), f"model.init_std={chosen['init_std']}"]


def grid_sweep(a) -> list[str]:
    """The sweep `grow predict` runs for this grid (orchestrator/commands/predict.py grid_sweep,
    written out so that --runs-only trains it as `grow run -m` before the fit's code exists)."""
    shapes = ",".join(f"{{layers:{a.layers},hidden:{w},ffn:{4 * w},heads:{w // a.head_dim},"
                      f"kv_heads:{w // a.head_dim}}}" for w in a.widths)
    return [f"schedule.stages.0.shape={shapes}", "schedule.stages.0.tokens=" + ",".join(map(str, a.tokens)),
            "seed=" + ",".join(map(str, a.seeds))]


def grid(a, work: Path, chosen: dict, form: str) -> tuple[int, Path]:
    """The `grow predict` sweep over the grid, fitted in `form` (kept even if not a law);
    (rc, the fit's copy loss_fit.<form>.json); --reuse-fit: that copy when it exists.
    --runs-only: the same members trained by `grow run -m` (grow predict reuses them)."""
    directory = work / "grid"
    copy = directory / f"loss_fit.{form}.json"
    planned = len(a.widths) * len(a.tokens) * len(a.seeds)
    if a.runs_only and all(_complete(directory / str(i)) for i in range(planned)):
        return 0, copy  # relaunching finished members only to find them finished: minutes on a loaded machine
    if a.runs_only:
        rc = grow(["run", "-m", *grid_overrides(a, chosen), *grid_sweep(a), f"hydra.sweep.dir={directory}"],
                  work / "grid-runs.log")
        return rc, copy
    if a.reuse_fit and copy.exists():
        return 0, copy
    args = ["predict", f"predict.widths={','.join(map(str, a.widths))}",
            f"predict.tokens={','.join(map(str, a.tokens))}", f"predict.seeds={','.join(map(str, a.seeds))}",
            "predict.keep_unlawful=true", f"predict.bootstrap={a.bootstrap}", f"predict.form={form}",
            *grid_overrides(a, chosen), f"hydra.sweep.dir={directory}"]
    rc = grow(args, work / f"grid.{form}.log")
    if rc in (0, 5):
        shutil.copyfile(directory / "loss_fit.json", copy)
        shutil.copyfile(directory / "loss_fit.png", directory / f"loss_fit.{form}.png")
    return rc, copy


def _complete(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text())["status"] == "complete"


def refit(a, fit: dict, form: str, path: Path) -> Path:
    """The same proxies' points fitted in another form, in this process (grow predict's fit,
    without relaunching the 36 finished members), written beside the first."""
    from orchestrator.budget.law_fit import fit_report
    points = [{"n": c["n"], "tokens": c["tokens"], "width": c["width"], "loss": x, "seed": s, "member": m}
              for c in fit["points"] for x, s, m in zip(c["seed_losses"], c["seeds"], c["members"])]
    other = fit_report(points, samples=a.bootstrap, max_interval=fit["max_interval"], form=form)
    keep = ("proxy_schedule", "parametrization", "sweep_dir", "sweep_exit_status", "planned", "partial")
    other.update({k: fit[k] for k in keep}, growth_correction=0.0, kept_unlawful=not other["lawful"])
    path.write_text(json.dumps(other, indent=1))
    return path


def targets(a, chosen: dict) -> dict[str, list[str]]:
    """The held-out runs' overrides (without the seed), by name."""
    widest, d = a.widths[-1], a.tokens[-1]
    lr, init = chosen["lr"], [f"model.init_std={chosen['init_std']}"]
    out = {f"size_4x_w{a.wide4}": one_stage(a, a.wide4, d, lr) + init,
           f"size_8x_w{a.wide8}": one_stage(a, a.wide8, d, lr) + init,
           f"tokens_4x_w{widest}": one_stage(a, widest, 4 * d, lr) + init}
    split = [float(x) for x in a.grown_split.split(",")]
    out[f"grown_w{widest}-{a.wide4}-{a.wide8}"] = grown(
        a, [widest, a.wide4, a.wide8], [whole(a, a.grown_tokens * d * f / sum(split)) for f in split], lr) + init
    if a.far:
        out[f"far_8x_4x_w{a.wide8}"] = one_stage(a, a.wide8, 4 * d, lr) + init
    return out


def small_grown(a, chosen: dict) -> dict[str, list[str]]:
    """The correction's schedules: the target's width ratios from the smallest proxy, its
    token split at the grid's smaller token counts."""
    w0 = a.widths[0]
    widths = [w0, round(w0 * a.wide4 / a.widths[-1] / a.head_dim) * a.head_dim,
              round(w0 * a.wide8 / a.widths[-1] / a.head_dim) * a.head_dim]
    split = [float(x) for x in a.grown_split.split(",")]
    return {f"small_grown_w{'-'.join(map(str, widths))}_d{d}":
            grown(a, widths, [whole(a, a.grown_tokens * d * f / sum(split)) for f in split], chosen["lr"])
            + [f"model.init_std={chosen['init_std']}"] for d in a.tokens[:2]}


def whole(a, tokens: float) -> int:
    step = a.batch * a.seq
    return int(tokens // step) * step


def trained(a, runs: dict[str, list[str]], work: Path, seeds: list[int]) -> dict[str, list[Path]]:
    """Each run's directory per seed, trained unless it finished before; --analyse-only: the
    finished ones alone (a target none of whose seeds finished is left out, and said so)."""
    out = {}
    for name, ov in runs.items():
        if a.analyse_only:
            dirs = [d for d in (run_dir_of(f"{name}-s{s}", common(a, s) + ov, work / "runs") for s in seeds)
                    if (d / "summary.json").exists() and json.loads((d / "summary.json").read_text())["status"]
                    == "complete"]
            if not dirs:
                console.print(f"[yellow]{name}: not trained; left out[/]")
                continue
            out[name] = dirs
        else:
            out[name] = [cached_run(f"{name}-s{s}", common(a, s) + ov, work / "runs", jobs=1) for s in seeds]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parametrization", default="standard", choices=("standard", "mup"))
    ap.add_argument("--widths", default="16,24,32,48", help="proxy widths")
    ap.add_argument("--tokens", default="131072,262144,524288", help="proxy token counts")
    ap.add_argument("--seeds", default="0,1,2", help="every proxy at these seeds")
    ap.add_argument("--target-seeds", default="0", help="every held-out target at these seeds")
    ap.add_argument("--wide4", type=int, default=96, help="width of ~4x the widest proxy's N")
    ap.add_argument("--wide8", type=int, default=136, help="width of ~8x the widest proxy's N")
    ap.add_argument("--far", action="store_true", help="also the 8x model at 4x the tokens")
    ap.add_argument("--grown-split", default="1,1,2", help="the grown schedule's token shares per stage")
    ap.add_argument("--grown-tokens", type=float, default=2,
                    help="the grown schedule's tokens, x the largest proxy token count (small ones: x theirs)")
    ap.add_argument("--search-width", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=16, help="warmup (and re-warm) steps")
    ap.add_argument("--ramp", type=int, default=16, help="msg mask ramp steps after a growth")
    ap.add_argument("--eval-batches", type=int, default=64, help="final val loss over this many batches")
    ap.add_argument("--bootstrap", type=int, default=400, help="bootstrap samples of the fit")
    ap.add_argument("--forms", default="chinchilla,kaplan", help="the law's forms fitted (grow predict predict.form)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-only", action="store_true", help="train everything; no fit, no results")
    ap.add_argument("--reuse-fit", action="store_true", help="the grid's fit from an earlier call, if any")
    ap.add_argument("--analyse-only", action="store_true",
                    help="train no target or small schedule: report on those that finished")
    ap.add_argument("--work-dir", default="/tmp/grow-bench-loss-law")
    a = ap.parse_args()
    a.widths = sorted(int(w) for w in a.widths.split(","))
    a.tokens = sorted(int(t) for t in a.tokens.split(","))
    a.seeds = [int(s) for s in a.seeds.split(",")]
    work = Path(a.work_dir) / a.parametrization
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    chosen = search(a, work)
    console.print(f"search: lr {chosen['lr']}, init_std {chosen['init_std']} ({time.time() - t0:.0f} s)")
    forms = a.forms.split(",")
    rc, first = grid(a, work, chosen, forms[0])
    console.print(f"grid: grow predict predict.form={forms[0]}: exit status {rc} ({time.time() - t0:.0f} s)")
    if rc not in (0, 5) and not a.runs_only:
        sys.exit(f"grow predict failed (rc {rc}); see {work / f'grid.{forms[0]}.log'}")
    fits = {forms[0]: first}
    if not a.runs_only:
        for form in forms[1:]:
            fits[form] = refit(a, json.loads(first.read_text()), form, first.with_name(f"loss_fit.{form}.json"))
    seeds = [int(s) for s in a.target_seeds.split(",")]
    held = trained(a, targets(a, chosen), work, seeds)
    console.print(f"targets trained ({time.time() - t0:.0f} s)")
    small = trained(a, small_grown(a, chosen), work, [a.seeds[0]])
    console.print(f"small grown schedules trained ({time.time() - t0:.0f} s)")
    if a.runs_only:
        return
    from bench.loss_report import report  # the analysis: the law, the targets, the figures
    name = "loss_prediction" if a.parametrization == "standard" else f"loss_prediction.{a.parametrization}"
    result = {"forms": {form: report(a, json.loads(path.read_text()), held, small, chosen, f"{name}.{form}")
                        for form, path in fits.items()}}
    result.update({"parametrization": a.parametrization, "search": chosen,
                   "settings": {k: v for k, v in vars(a).items()}, "work_dir": str(work),
                   "wall_s": round(time.time() - t0, 1), "loadavg_end": os.getloadavg(), "machine": machine()})
    write_json(f"{name}.json", result)


if __name__ == "__main__":
    main()
