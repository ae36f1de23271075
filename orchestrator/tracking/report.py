"""What the user sees at the end: summary.json, a table, and the loss curve with growths."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.atomic import write_json_atomic
from orchestrator.budget.ledger import Ledger
from orchestrator.secrets import redact_url
from orchestrator.tracking.routing import stage_routing


def drop_torn_tail(path: Path) -> int:
    """Cut a last line that a kill left without its newline, so the next record starts on
    a line of its own instead of being glued onto the fragment (and lost with it). Returns
    the bytes removed. Only whole lines are ever sent to MLflow, so the cut never goes
    below what the tracker has sent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return 0  # /dev/null for non-leader ranks
    with open(path, "rb+") as f:
        end = st.st_size
        while end > 0:  # back to the last newline, a block at a time
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            if start + len(block) == st.st_size and block.endswith(b"\n"):
                return 0
            nl = block.rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            end = start
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
        return st.st_size - end


class MetricsLog:
    """`metrics.jsonl`: every logged point, kept on disk for the plot. Steps redone after
    a resume are appended again; readers keep the last value per (key, step). A line cut
    short by a kill is removed on open and skipped by readers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        drop_torn_tail(self.path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, stage: str, step: int, metrics: dict) -> None:
        self._file.write(json.dumps({"stage": stage, "step": step, "time": round(time.time(), 3), **metrics}) + "\n")

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def read(path: Path) -> list[dict]:
        points: dict[tuple, dict] = {}
        if Path(path).exists():
            for line in Path(path).read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                    continue
                points[(rec["step"], tuple(sorted(k for k in rec if k not in ("stage", "step", "time"))))] = rec
        return sorted(points.values(), key=lambda r: r["step"])


def build_summary(entries: list[dict], ledger: Ledger, tracking: dict, status: str) -> dict:
    total = ledger.total
    return {
        "status": status,
        "stages": entries,
        "totals": {"tokens": total.tokens, "flops": total.flops, "gpu_hours": total.gpu_hours,
                   "cost_usd": total.cost_usd, "wall_s": total.wall_s,
                   "tokens_by_source": dict(sorted(total.sources.items()))},
        "mlflow": {"tracking_uri": redact_url(tracking.get("tracking_uri") or "") or None, "experiment": tracking.get("experiment"),
                   "parent_run_id": tracking.get("parent_run_id")},
    }


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = Path(run_dir) / "summary.json"
    write_json_atomic(path, summary)
    return path


def _transition(g: dict | None) -> str:
    """How a stage was reached: the growth operator, and `rope` where RoPE's scaling switched."""
    if not g:
        return "-"
    return "+".join(part for part in (g["operator"], "rope" if g.get("positions") else None) if part)


def print_table(console: Console, summary: dict) -> None:
    table = Table(title=f"Growth schedule: {summary['status']}")
    for col in ("stage", "params", "tokens", "steps", "FLOPs", "growth", "|val change|", "val loss"):
        table.add_column(col, justify="left" if col in ("stage", "growth") else "right")
    for s in summary["stages"]:
        g = s["growth"]
        table.add_row(s["name"], f"{s['params']:,}", f"{s['tokens']:,}", str(s["steps"]),
                      f"{s['flops']:.3g}", _transition(g),
                      f"{abs(g['val_loss_after'] - g['val_loss_before']):.1e}" if g else "-",
                      f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "-")
    t = summary["totals"]
    table.add_row("total", "", f"{t['tokens']:,}", "", f"{t['flops']:.3g}", "", "", "", style="bold")
    console.print(table)
    console.print(f"GPU-hours {t['gpu_hours']:.4f}  cost ${t['cost_usd']:.4f}  wall {t['wall_s']:.1f} s")


def plot_losses(metrics_path: Path, out: Path, growth_steps: list[tuple[int, str]]) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = MetricsLog.read(metrics_path)
    train = [(p["step"], p["train/loss"]) for p in points if "train/loss" in p]
    val = [(p["step"], p["val/loss"]) for p in points if "val/loss" in p]
    if not train:
        return None
    routed = [p for p in points if "moe/max_load" in p]
    if routed:  # a mixture of experts: its router's load balance in a panel below
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation loss")
    for key in sorted({k for p in points for k in p if k.startswith("val/") and k.endswith("/loss") and k != "val/loss"}):
        per_source = [(p["step"], p[key]) for p in points if key in p]
        ax.plot(*zip(*per_source), ".--", ms=3, lw=0.8, label=f"validation loss: {key.split('/')[1]}")
    for step, name in growth_steps:
        ax.axvline(step, color="tab:red", ls="--", lw=1)
        ax.annotate(f"grow -> {name}", (step, 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="tab:red")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    if routed:
        ax.set_xlabel("")
        routing_panel(bx, routed, growth_steps)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def routing_panel(ax, routed: list[dict], growth_steps: list[tuple[int, str]]) -> None:
    """The router's load balance per step: the busiest expert's load (1 = balanced) and the
    load-balancing loss (top_k at balance), with each mixture stage's dropped share."""
    steps = [p["step"] for p in routed]
    ax.plot(steps, [p["moe/max_load"] for p in routed], lw=0.8, color="tab:purple", label="busiest expert's load")
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_ylabel("max load (1 = balanced)", fontsize=8)
    aux = ax.twinx()
    aux.plot(steps, [p.get("moe/aux_loss", float("nan")) for p in routed], lw=0.8, color="tab:green",
             label="aux loss (top_k at balance)")
    aux.set_ylabel("aux loss", fontsize=8)
    for stage, r in stage_routing(routed).items():
        first = next(p["step"] for p in routed if p["stage"] == stage)
        ax.annotate(f"{stage}: dropped {r['dropped_share']:.1%}", (first, 0.95), xycoords=("data", "axes fraction"),
                    va="top", fontsize=7)
    for step, _ in growth_steps:
        ax.axvline(step, color="tab:red", ls="--", lw=1)
    lines = ax.get_lines()[:1] + aux.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="lower right")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
