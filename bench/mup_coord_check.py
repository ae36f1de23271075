"""muP coordinate check (as microsoft/mup's): the mean |activation| of each layer type after a
few Adam steps, across widths, standard vs muP. Under muP the curves stay flat in width;
under the standard parametrization (fixed init std, one learning rate) they grow.

    nice python -m bench.mup_coord_check                       # widths 64..1024, CPU, ~2-4 min on 2 busy cores
    nice python -m bench.mup_coord_check --widths 64,128,256 --steps 3

Layer types: the embedding's output (with its multiplier: what the first block reads),
the attention block's output, the MLP's output (both what they add to the residual stream,
averaged over the blocks), and the logits. The model is the project's DecoderLM (2 blocks,
head_dim 32, heads and FFN grow with the width), trained on the embedded text at one
learning rate for both parametrizations (muP: the hidden matrices at lr / m, m = width /
the narrowest width). Writes bench/results/mup_coord_check.json (the values per step and
width, and per parametrization the ratio of the widest to the narrowest width's value at
the last step) and mup_coord_check.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import RESULTS, console, machine, table, write_json
from bench.mup_setup import spec_for, step, text_batches, trainer

LAYER_TYPES = ("embedding", "attention", "mlp", "logits")
PARAMETRIZATIONS = ("standard", "mup")


def record_activations(model) -> tuple[dict[str, list[float]], list]:
    """Forward hooks filling {layer type: [mean |x| per call]}; returns (store, handles)."""
    store: dict[str, list[float]] = {k: [] for k in LAYER_TYPES}

    def keep(kind):
        def hook(_module, _inputs, output):
            store[kind].append(output.detach().abs().mean().item())
        return hook

    def first_block_input(_module, inputs):
        store["embedding"].append(inputs[0].detach().abs().mean().item())

    handles = [model.layers[0].register_forward_pre_hook(first_block_input), model.register_forward_hook(keep("logits"))]
    for block in model.layers:
        handles += [block.attn.register_forward_hook(keep("attention")), block.mlp.register_forward_hook(keep("mlp"))]
    return store, handles


def coord_check(hidden: int, parametrization: str, base: int, lr: float, steps: int, batches) -> list[dict]:
    """Mean |activation| per layer type, on the batch each step trains on (before its update)
    for steps 1..`steps`: step 1 is the init, later ones show what training did."""
    model, optimizer = trainer(spec_for(hidden, parametrization, base), seed=0)
    out = []
    for t in range(steps):
        store, handles = record_activations(model)
        step(model, optimizer, batches[t], lr, clip=float("inf"))
        for h in handles:
            h.remove()
        out.append({k: sum(v) / len(v) for k, v in store.items()})
    return out


def plot(results: dict, widths: list[int], steps: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, p in zip(axes, PARAMETRIZATIONS):
        for kind in LAYER_TYPES:
            ax.plot(widths, [results[p][str(w)][steps - 1][kind] for w in widths], marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (hidden)")
        ax.set_title(f"{p}: mean |activation| after {steps - 1} Adam steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean |x|")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    console.print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="64,128,256,512,1024")
    ap.add_argument("--steps", type=int, default=4, help="measured steps (the last is after steps-1 updates)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="1: on a busy machine more threads only spin")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    batches, _ = text_batches(args.batch, args.seq, args.steps, 1)
    results: dict = {p: {} for p in PARAMETRIZATIONS}
    for p in PARAMETRIZATIONS:
        for w in widths:
            results[p][str(w)] = coord_check(w, p, widths[0], args.lr, args.steps, batches)
            console.print(f"{p:8s} width {w:5d}: " + ", ".join(
                f"{k} {v:.3g}" for k, v in results[p][str(w)][-1].items()))
    last = args.steps - 1
    ratios = {p: {k: results[p][str(widths[-1])][last][k] / results[p][str(widths[0])][last][k] for k in LAYER_TYPES}
              for p in PARAMETRIZATIONS}
    table(f"mean |activation| widest / narrowest ({widths[-1]} / {widths[0]}) after {last} steps",
          ["layer type", *PARAMETRIZATIONS], [[k, *(ratios[p][k] for p in PARAMETRIZATIONS)] for k in LAYER_TYPES])
    write_json("mup_coord_check.json", {
        "widths": widths, "steps": args.steps, "lr": args.lr, "batch": args.batch, "seq_len": args.seq,
        "base_hidden": widths[0], "layer_types": list(LAYER_TYPES), "activations": results,
        "ratio_widest_to_narrowest": ratios, "machine": machine()}, args.out)
    plot(results, widths, args.steps, Path(args.out) / "mup_coord_check.png")


if __name__ == "__main__":
    main()
