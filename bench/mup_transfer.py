"""muP learning-rate transfer (the muP paper's figure 1): a learning-rate sweep at several
widths on the embedded text, standard vs muP, validation loss against log2(lr) per width.
Under muP the best learning rate is the same grid point at every width; under the standard
parametrization it moves as the model widens.

    nice python -m bench.mup_transfer                  # widths 32..256, 7 rates, 2 seeds, 3 runs at once: ~15-20 min on 2 busy cores
    nice python -m bench.mup_transfer --widths 64,128,256,512 --steps 200 --head-dim 32   # a longer look

The model is the project's DecoderLM (2 blocks, head_dim 16, heads and FFN grow with the
width; init std 0.02 under standard, the base width's 0.1 under muP) trained with the project's AdamW (muP: hidden matrices at lr / m, m = width / the
narrowest width) for --steps steps (linear warmup over the first tenth, then linear decay to 0,
gradient clipping 1, no weight decay) on the same batches for every run; the loss is the
mean over fixed validation batches, averaged over --seeds inits. Writes
bench/results/mup_transfer.json (every loss, the best learning rate per width and
parametrization, whether it is one grid point, and the loss each width loses when trained
at the narrowest width's best rate instead of its own: the cost of transferring) and
mup_transfer.png.
"""
from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.common import RESULTS, console, machine, table, write_json
from bench.mup_setup import evaluate, spec_for, step, text_batches, trainer

PARAMETRIZATIONS = ("standard", "mup")


def lr_at(t: int, steps: int, peak: float) -> float:
    """Linear warmup over the first tenth, then linear decay to 0 (the loss at the end is
    then not the noise of the last steps at full rate)."""
    warmup = max(1, steps // 10)
    if t < warmup:
        return peak * (t + 1) / warmup
    return peak * (steps - t) / (steps - warmup)


def final_loss(hidden: int, parametrization: str, base: int, head_dim: int, lr: float, train, val,
               threads: int = 1, seed: int = 0, init_std: float = 0.02) -> float:
    torch.set_num_threads(threads)
    model, optimizer = trainer(spec_for(hidden, parametrization, base, head_dim=head_dim, init_std=init_std), seed=seed)
    for t, batch in enumerate(train):
        loss = step(model, optimizer, batch, lr_at(t, len(train), lr))
        if not math.isfinite(loss):
            return float("nan")
    return evaluate(model, val)


def plot(losses: dict, widths: list[int], log2_lrs: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, p in zip(axes, PARAMETRIZATIONS):
        for w in widths:
            ys = losses[p][str(w)]
            line, = ax.plot(log2_lrs, ys, marker="o", ms=3, label=f"width {w}")
            finite = [(y, x) for x, y in zip(log2_lrs, ys) if math.isfinite(y)]
            if finite:
                best_y, best_x = min(finite)
                ax.plot([best_x], [best_y], marker="*", ms=12, color=line.get_color())
        ax.set_xlabel("log2(learning rate)")
        ax.set_title(p)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    console.print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="32,64,128,256")
    ap.add_argument("--log2-lrs", default="-10,-9,-8,-7,-6,-5,-4")
    ap.add_argument("--std-init-std", type=float, default=0.02, help="standard: GPT-2's init std")
    ap.add_argument("--mup-init-std", type=float, default=0.1,
                    help="muP: the base width's init std (0.02 leaves the base's hidden layers too small to learn "
                         "in 80 steps, and muP transfers that to every width)")
    ap.add_argument("--seeds", type=int, default=2, help="inits per point; the loss is their mean")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="per run; 1: on a busy machine more threads only spin")
    ap.add_argument("--jobs", type=int, default=3, help="runs at once (processes)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    log2_lrs = [float(x) for x in args.log2_lrs.split(",")]
    train, val = text_batches(args.batch, args.seq, args.steps, args.val_batches)
    losses: dict = {p: {} for p in PARAMETRIZATIONS}
    best: dict = {p: {} for p in PARAMETRIZATIONS}
    regret: dict = {p: {} for p in PARAMETRIZATIONS}
    init_std = {"standard": args.std_init_std, "mup": args.mup_init_std}
    runs = [(p, w, x, s) for p in PARAMETRIZATIONS for w in widths for x in log2_lrs for s in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {run: pool.submit(final_loss, run[1], run[0], widths[0], args.head_dim, 2.0 ** run[2], train, val,
                                    args.threads, run[3], init_std[run[0]]) for run in runs}
    for p in PARAMETRIZATIONS:
        for w in widths:
            row = [sum(futures[(p, w, x, s)].result() for s in range(args.seeds)) / args.seeds for x in log2_lrs]
            losses[p][str(w)] = row
            finite = [(y, x) for x, y in zip(log2_lrs, row) if math.isfinite(y)]
            best[p][str(w)] = min(finite)[1] if finite else None
            console.print(f"{p:8s} width {w:4d}: " + " ".join(f"{y:.3f}" for y in row)
                          + f"  best log2(lr) {best[p][str(w)]}")
    for p in PARAMETRIZATIONS:  # what using the narrowest width's best rate costs at each width
        at_base = log2_lrs.index(best[p][str(widths[0])]) if best[p][str(widths[0])] is not None else None
        for w in widths:
            row = losses[p][str(w)]
            regret[p][str(w)] = None if at_base is None else row[at_base] - min(y for y in row if math.isfinite(y))
    table("best log2(learning rate) per width; loss lost by using the narrowest width's best instead",
          ["width", *(f"best {p}" for p in PARAMETRIZATIONS), *(f"lost {p}" for p in PARAMETRIZATIONS)],
          [[w, *(best[p][str(w)] for p in PARAMETRIZATIONS), *(regret[p][str(w)] for p in PARAMETRIZATIONS)]
           for w in widths])
    same = {p: len(set(best[p].values())) == 1 for p in PARAMETRIZATIONS}
    console.print(f"one best grid point across widths: standard {same['standard']}, muP {same['mup']}")
    write_json("mup_transfer.json", {
        "widths": widths, "log2_lrs": log2_lrs, "steps": args.steps, "batch": args.batch, "seq_len": args.seq,
        "head_dim": args.head_dim, "seeds": args.seeds, "init_std": init_std, "base_hidden": widths[0], "val_loss": losses,
        "best_log2_lr": best, "loss_lost_with_narrowest_best_lr": regret,
        "same_best_across_widths": same, "machine": machine()}, args.out)
    plot(losses, widths, log2_lrs, Path(args.out) / "mup_transfer.png")


if __name__ == "__main__":
    main()
