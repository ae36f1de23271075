"""Helpers shared by the benchmarks in bench/: results paths, JSON, tables, timing, load."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

console = Console(width=140)


def machine() -> dict:
    """What the figures were measured on, and how busy it was (1-minute load average)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    import torch
    return {"host_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15": [round(x, 2) for x in load], "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(name: str, data: dict, out_dir: Path | None = None) -> Path:
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    console.print(f"wrote {path}")
    return path


def table(title: str, columns: list[str], rows: list[list]) -> None:
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    console.print(t)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5 or (abs(v) < 1e-3 and v != 0):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def median(xs) -> float:
    return float(statistics.median(xs))


def sync(device) -> None:
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def timed(fn, device=None) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def stage_literal(name: str, shape, tokens: int, batch: int, seq: int, peak: float, warmup: int,
                  min_lr: float, growth: dict | None = None) -> str:
    """One `schedule.stages` element in Hydra's override grammar; shape = (layers, hidden, ffn, heads)."""
    layers, hidden, ffn, heads = shape
    g = "null" if growth is None else "{" + ",".join(f"{k}:{v}" for k, v in growth.items()) + "}"
    return (f"{{name:{name},shape:{{layers:{layers},hidden:{hidden},ffn:{ffn},heads:{heads},kv_heads:null}},"
            f"tokens:{tokens},batch_size:{batch},seq_len:{seq},"
            f"lr:{{peak:{peak},warmup_steps:{warmup},min:{min_lr:.3g},decay:cosine}},growth:{g}}}")


def one_stage_config(shape, batch: int, seq: int, steps: int = 1000, extra: list[str] | None = None):
    """A validated RunConfig with one stage of `shape` (tracking off unless `extra` says so),
    its ModelSpec, and the prepared embedded data."""
    from orchestrator.data import prepare_data
    from orchestrator.commands.plan import compose_config
    from orchestrator.schedule import stage_spec
    stage = stage_literal("s", shape, steps * batch * seq, batch, seq, 1e-3, 10, 1e-4)
    cfg = compose_config(["tracking=off", "schedule.name=bench", f"schedule.stages=[{stage}]", *(extra or [])])
    data = prepare_data(cfg.data)
    m = cfg.model
    tok = data.tokenizer.vocab_size
    vocab = m.vocab_size or -(-tok // m.vocab_multiple) * m.vocab_multiple
    return cfg, stage_spec(cfg, cfg.schedule.stages[0], vocab), data
