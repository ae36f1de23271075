"""Upcycling a trained dense model into a mixture of experts, against the alternatives, at
equal training FLOPs after the switch, through the real runner (`grow run`).

Every run starts from the same dense pretraining (stage 1: --pre-steps at a fixed rate, held
after its warmup, so the switch comes mid-training, as in sparse upcycling). After it:
  dense         the dense model trained on (stage 2 of the same shape, no growth) for as many
                FLOPs as the mixture's stage 2 takes (more tokens: a dense token costs less);
  upcycle       stage 2 a mixture of --experts experts, top --top-k, every expert a copy of
                the dense FFN (function-preserving: the runner checks it), --post-steps;
  drop_upcycle  the same, --drop-ratio of each expert's intermediate dims re-initialised;
  scratch       the same mixture trained from scratch (one stage) for the upcycled run's
                whole FLOPs (pretraining + stage 2).
Each arm's stage-2 peak LR (scratch: its peak) is swept at seed 0 over --sweep-lr x --peak-lr,
widened by halving or doubling (up to --sweep-extend times) while the best (lowest final
validation loss) sits on the edge; seeds 1.. run at the chosen rate. Per seed, the dense
arm's final validation loss is the target; `flops_frac` is the stage-2 FLOPs at which an arm
first reaches it (interpolated between evaluations) over the dense arm's stage-2 FLOPs
(< 1: better than training the dense model on; null: never); scratch's is its FLOPs from
zero over the dense arm's total. Losses and FLOPs do not depend on the machine's load (it is
recorded anyway); no wall time is published.

    python -m bench.upcycle --jobs 4               # 3 seeds, 25 runs: ~90 min on 2 cores at load 15-25
    python -m bench.upcycle --seeds 1 --sweep-lr 1 # a quick look (4 runs)

Writes bench/results/upcycle.json (rewritten at the end) and upcycle.png (validation loss
against FLOPs after the switch, seed 0, the dense target dashed). Runs are cached in
--work-dir by their overrides (bench/run_cache.py), so a second call reuses them.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import RESULTS, console, machine, stage_literal, table
from bench.growth_vs_scratch import crossing, curve, next_lr, spread
from bench.run_cache import cached_run

ARMS = ("dense", "upcycle", "drop_upcycle", "scratch")
# Published figures (README): what the arms are compared with
ANCHORS = {"sparse_upcycling": "Komatsuzaki et al. 2023: upcycled MoE beat dense continuation at equal extra "
                               "compute (T5 and ViT, ~+40-50% of the dense pretraining compute)",
           "drop_upcycling": "Drop-Upcycling (ICLR 2025): an upcycled MoE matched a dense model of similar "
                             "total size at about 1/4 of its training FLOPs"}


def moe_literal(stage: str, experts: int, top_k: int, aux: float) -> str:
    """`stage` (a stage_literal) with a mixture-of-experts FFN."""
    head, tail = stage.split(",tokens:", 1)
    return f"{head},moe:{{experts:{experts},top_k:{top_k},aux_loss_coef:{aux}}},tokens:{tail}"


def step_tokens(a) -> int:
    return a.batch * a.seq


def common(a, seed: int) -> list[str]:
    return ["tracking=off", f"train.eval_every_steps={a.eval_every}", f"train.eval_batches={a.eval_batches}",
            "checkpoint.every_steps=1000000", f"seed={seed}", f"engine.threads={a.threads}"]


def shape(a) -> tuple[int, int, int, int]:
    return tuple(int(x) for x in a.shape.split(","))


def literal(a, name: str, steps: int, peak: float, warmup: int, decay: str, moe: bool, growth=None) -> str:
    s = stage_literal(name, shape(a), steps * step_tokens(a), a.batch, a.seq, peak=peak, warmup=warmup,
                      min_lr=peak * a.min_lr_frac, growth=growth, decay=decay)
    return moe_literal(s, a.experts, a.top_k, a.aux) if moe else s


def overrides(a, arm: str, peak: float, seed: int, dense_steps: int | None = None) -> list[str]:
    """The `grow run` overrides of one arm at stage-2 (scratch: its own) peak LR `peak`.
    dense_steps: the dense arm's stage-2 steps (`equal_flops_steps`)."""
    if arm == "scratch":
        stages = [literal(a, "moe", a.scratch_steps, peak, a.warmup, "cosine", moe=True)]
    else:
        pre = literal(a, "dense", a.pre_steps, a.pre_lr, a.warmup, "constant", moe=False)
        if arm == "dense":
            post = literal(a, "dense_more", dense_steps, peak, a.rewarm, "cosine", moe=False)
        else:
            growth = {"operator": arm, "ramp_steps": 0, **({"drop_ratio": a.drop_ratio} if arm == "drop_upcycle" else {})}
            post = literal(a, "moe", a.post_steps, peak, a.rewarm, "cosine", moe=True, growth=growth)
        stages = [pre, post]
    group = [f"growth={arm}"] if arm in ("upcycle", "drop_upcycle") else []  # the operator's defaults
    return common(a, seed) + group + [f"schedule.name=upcycle_{arm}", "schedule.stages=[" + ",".join(stages) + "]"]


def specs(a):
    """(dense spec, mixture spec) of the runs, as the runner builds them."""
    from orchestrator.commands.plan import compose_config
    from orchestrator.schedule import padded_vocab, stage_spec, tokenizer_vocab
    cfg = compose_config(overrides(a, "upcycle", a.pre_lr, 0))
    vocab = padded_vocab(cfg, tokenizer_vocab(cfg))
    return tuple(stage_spec(cfg, st, vocab) for st in cfg.schedule.stages)


def equal_flops_steps(a) -> tuple[int, int]:
    """(dense arm's stage-2 steps, scratch's steps): the whole steps whose FLOPs come closest
    to the mixture's stage 2 (dense), and to the upcycled run's whole FLOPs (scratch)."""
    from growth_ops.spec import flops_per_token
    dense, moe = specs(a)
    per_step_dense, per_step_moe = (flops_per_token(s, a.seq) * step_tokens(a) for s in (dense, moe))
    post = a.post_steps * per_step_moe
    return (max(1, round(post / per_step_dense)),
            max(1, round((a.pre_steps * per_step_dense + post) / per_step_moe)))


def after_switch(c: dict) -> dict:
    """The curve from the switch on, FLOPs counted from it (scratch: unchanged)."""
    if not c["growth_flops"]:
        return c
    f0 = c["growth_flops"][0]
    keep = [i for i, f in enumerate(c["flops"]) if f >= f0 - 1e-6 * f0]
    return {**c, "flops": [c["flops"][i] - f0 for i in keep], "wall_s": [c["wall_s"][i] for i in keep],
            "val_loss": [c["val_loss"][i] for i in keep], "switch_flops": f0}


def routing(run_dir: Path, last: int = 10) -> dict | None:
    """The mixture's load balance over its last `last` logged steps (orchestrator.model.moe_metrics)."""
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "moe/max_load" in r][-last:]
    if not recs:
        return None
    mean = lambda k: sum(r[k] for r in recs) / len(recs)  # noqa: E731
    return {"max_load": mean("moe/max_load"), "aux_loss": mean("moe/aux_loss"),
            "dropped_tokens": sum(r.get("moe/dropped_tokens", 0.0) for r in recs)}


def compare(curves: dict[str, dict], dense_total: float) -> dict:
    """One seed's figures: each arm's final loss and FLOPs to reach the dense arm's final loss."""
    target = curves["dense"]["val_loss"][-1]
    f_dense = curves["dense"]["flops"][-1]
    out = {"target_val_loss": target}
    for arm, c in curves.items():
        f, _ = crossing(c, target)
        base = dense_total if arm == "scratch" else f_dense
        row = {"final_val_loss": c["val_loss"][-1], "flops": c["flops"][-1], "flops_to_target": f,
               "flops_frac": None if f is None else f / base}
        if arm == "scratch":  # its loss at the stage-2 budget alone, and at the upcycled run's whole budget
            row["val_loss_at_stage2_flops"] = loss_at(c, f_dense)
        out[arm] = row
    return out


def loss_at(c: dict, flops: float) -> float | None:
    """The validation loss at `flops`, interpolated between evaluations; None outside them."""
    xs, ys = c["flops"], c["val_loss"]
    if not xs or flops < xs[0]:
        return None
    for i in range(1, len(xs)):
        if xs[i] >= flops:
            f = (flops - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    return ys[0] if flops == xs[0] else None  # past the run's end


def run_all(a, todo: dict[tuple, list[str]], work: Path) -> dict[tuple, dict]:
    """(arm, peak, seed) -> overrides, run --jobs at a time: their curves (after the switch)
    and routing."""
    def one(item):
        (arm, peak, seed), ov = item
        d = cached_run(f"{arm}-s{seed}", ov, work, a.jobs)
        return {**after_switch(curve(d)), "routing": routing(d), "run_dir": str(d)}
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        return dict(zip(todo, pool.map(one, todo.items())))


def bench(a) -> tuple[dict, dict]:
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dense_steps, a.scratch_steps = equal_flops_steps(a)
    base = [a.peak_lr * float(m) for m in a.sweep_lr.split(",")]
    ov = lambda arm, p, s: overrides(a, arm, p, s, dense_steps)  # noqa: E731
    sweep: dict[tuple, dict] = {}
    todo = {(arm, p, 0): ov(arm, p, 0) for arm in ARMS for p in base}
    while todo:  # every arm's next edge rate side by side
        sweep.update(run_all(a, todo, work))
        chosen = {arm: min((k for k in sweep if k[0] == arm), key=lambda k: sweep[k]["val_loss"][-1])[1]
                  for arm in ARMS}
        todo = {}
        for arm, p in chosen.items():
            nxt = next_lr([k[1] for k in sweep if k[0] == arm], p, base, a.sweep_extend)
            if nxt is not None:
                todo[arm, nxt, 0] = ov(arm, nxt, 0)
    final = {**sweep, **run_all(a, {(arm, chosen[arm], s): ov(arm, chosen[arm], s)
                                     for arm in ARMS for s in range(1, a.seeds)}, work)}
    per_seed = []
    for s in range(a.seeds):
        curves = {arm: final[arm, chosen[arm], s] for arm in ARMS}
        dense_total = curves["dense"]["switch_flops"] + curves["dense"]["flops"][-1]
        per_seed.append({"seed": s, **compare(curves, dense_total)})
    arms = {}
    for arm in ARMS:
        tried = sorted(k[1] for k in sweep if k[0] == arm)
        arms[arm] = {"peak_lr": chosen[arm], "lr_bracketed": tried[0] < chosen[arm] < tried[-1],
                     "sweep": [{"peak_lr": p, "final_val_loss": sweep[arm, p, 0]["val_loss"][-1]} for p in tried],
                     "final_val_loss": spread([r[arm]["final_val_loss"] for r in per_seed]),
                     "flops_frac": spread([r[arm]["flops_frac"] for r in per_seed]),
                     "routing_seed0": final[arm, chosen[arm], 0]["routing"]}
    arms["scratch"]["val_loss_at_stage2_flops"] = spread([r["scratch"]["val_loss_at_stage2_flops"] for r in per_seed])
    dense_spec, moe_spec = specs(a)
    from growth_ops.spec import active_parameters, count_parameters
    loads = [c["loadavg_1min_end"] for c in final.values() if c["loadavg_1min_end"] is not None]
    result = {
        "setup": {"shape_layers_hidden_ffn_heads": shape(a), "experts": a.experts, "top_k": a.top_k,
                  "aux_loss_coef": a.aux, "drop_ratio": a.drop_ratio, "batch": a.batch, "seq": a.seq,
                  "pre_steps": a.pre_steps, "pre_lr": a.pre_lr, "post_steps_moe": a.post_steps,
                  "post_steps_dense": dense_steps, "scratch_steps": a.scratch_steps, "warmup": a.warmup,
                  "rewarm": a.rewarm, "min_lr_frac": a.min_lr_frac, "eval_every": a.eval_every,
                  "eval_batches": a.eval_batches, "sweep_lr": base, "sweep_extend": a.sweep_extend,
                  "seeds": a.seeds, "dense_params": count_parameters(dense_spec),
                  "moe_params": count_parameters(moe_spec), "moe_active_params": active_parameters(moe_spec),
                  "stage2_flops": per_seed[0]["upcycle"]["flops"],
                  "switch_flops": final["upcycle", chosen["upcycle"], 0]["switch_flops"]},
        "arms": arms, "seeds": per_seed, "anchors": ANCHORS,
        "load_note": "validation losses and FLOPs do not depend on the machine's load; no wall time is published",
        "runs_loadavg_1min_end": [min(loads), max(loads)] if loads else None,
    }
    return result, {arm: final[arm, chosen[arm], 0] for arm in ARMS}


def plot(curves: dict[str, dict], target: float, switch: float, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, c in curves.items():
        xs = [f + (switch if arm != "scratch" else 0.0) for f in c["flops"]]
        ax.plot(xs, c["val_loss"], ".-", ms=3, lw=1, label=arm if arm != "scratch" else "MoE from scratch")
    ax.axvline(switch, color="grey", lw=0.8, ls=":")
    ax.axhline(target, color="black", lw=0.8, ls="--", label="dense arm's final loss")
    ax.set_xlabel("training FLOPs (from the start; the switch dotted)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Upcycling vs dense continuation vs MoE from scratch (seed 0)")
    lo = min(min(c["val_loss"]) for c in curves.values())
    ax.set_ylim(lo - 0.05, target + 0.6)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def print_table(result: dict) -> None:
    rows = []
    for arm, r in result["arms"].items():
        fl, fr = r["final_val_loss"], r["flops_frac"]
        rows.append([arm, r["peak_lr"], fl["mean"], fl["std"],
                     fr["mean"], fr["std"], f"{fr['reached']}/{result['setup']['seeds']}"])
    table("Upcycling at equal FLOPs after the switch (val loss; FLOPs to the dense arm's final loss / dense's)",
          ["arm", "peak LR", "final val loss", "std", "flops_frac", "std", "reached"], rows)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2,64,176,2", help="layers,hidden,ffn,heads of the dense model and each expert")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--aux", type=float, default=0.01, help="aux_loss_coef")
    p.add_argument("--drop-ratio", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--pre-steps", type=int, default=300)
    p.add_argument("--post-steps", type=int, default=300, help="the mixture's stage-2 steps")
    p.add_argument("--pre-lr", type=float, default=3e-3)
    p.add_argument("--peak-lr", type=float, default=3e-3, help="the sweep's base rate")
    p.add_argument("--sweep-lr", default="0.5,1,2")
    p.add_argument("--sweep-extend", type=int, default=1)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rewarm", type=int, default=20)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench-upcycle"))
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse(argv)
    result, curves = bench(a)
    result["machine"] = machine()
    print_table(result)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "upcycle.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(curves, result["seeds"][0]["target_val_loss"], result["setup"]["switch_flops"], out / "upcycle.png")
    console.print(f"wrote {out / 'upcycle.json'} and {out / 'upcycle.png'}")


if __name__ == "__main__":
    main()
