"""Helpers shared by the benchmarks in bench/: results paths, JSON, tables, timing, load."""
from __future__ import annotations

import json
import math
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
                  min_lr: float, growth: dict | None = None, decay: str = "cosine",
                  decay_fraction: float = 0.2) -> str:
    """One `schedule.stages` element in Hydra's override grammar; shape = (layers, hidden, ffn, heads)."""
    layers, hidden, ffn, heads = shape
    g = "null" if growth is None else "{" + ",".join(f"{k}:{v}" for k, v in growth.items()) + "}"
    return (f"{{name:{name},shape:{{layers:{layers},hidden:{hidden},ffn:{ffn},heads:{heads},kv_heads:null}},"
            f"tokens:{tokens},batch_size:{batch},seq_len:{seq},"
            f"lr:{{peak:{peak:.4g},warmup_steps:{warmup},min:{min_lr:.3g},decay:{decay},"
            f"decay_fraction:{decay_fraction}}},growth:{g}}}")


def one_stage_config(shape, batch: int, seq: int, steps: int = 1000, extra: list[str] | None = None):
    """A validated RunConfig with one stage of `shape` (tracking off unless `extra` says so),
    its ModelSpec, and the prepared embedded data."""
    from orchestrator.data import prepare_data
    from orchestrator.commands.plan import compose_config
    from orchestrator.schedule import padded_vocab, stage_spec
    stage = stage_literal("s", shape, steps * batch * seq, batch, seq, 1e-3, 10, 1e-4)
    cfg = compose_config(["tracking=off", "schedule.name=bench", f"schedule.stages=[{stage}]", *(extra or [])])
    data = prepare_data(cfg.data)
    return cfg, stage_spec(cfg, cfg.schedule.stages[0], padded_vocab(cfg, data.tokenizer.vocab_size)), data


def run_vocab(overrides: list[str] | None = None) -> int:
    """The model's vocabulary in a `grow run` with `overrides` (the package's padded
    vocabulary: the configured tokenizer's size rounded up to model.vocab_multiple, or
    model.vocab_size), read from the config alone, before any data is prepared."""
    from orchestrator.commands.plan import compose_config
    from orchestrator.schedule import padded_vocab, tokenizer_vocab
    cfg = compose_config(["tracking=off", *(overrides or [])])
    return padded_vocab(cfg, tokenizer_vocab(cfg))


# -- interleaved A/B timing that refuses to publish what it cannot resolve -------------------

def busy_limit(cpus: int | None = None) -> float:
    """The 1-minute load average above which the machine counts as busy: 0.75 per core
    (1.5 on 2 cores)."""
    return 0.75 * (cpus or os.cpu_count() or 1)


def ratio_summary(ratios: list[float]) -> dict:
    """Mean of paired ratios (b/a per pair of adjacent blocks), its sample std, and the spread:
    twice the standard error (a ~95% interval's half-width), as a fraction."""
    n = len(ratios)
    mean = statistics.fmean(ratios)
    std = statistics.stdev(ratios) if n > 1 else float("inf")
    return {"pairs": n, "ratio": mean, "effect": mean - 1.0, "std": std, "spread": 2 * std / math.sqrt(n)}


def settled(ratios: list[float], target_spread: float, min_pairs: int) -> bool:
    """Enough pairs that the spread is at most `target_spread` (never before `min_pairs`)."""
    return len(ratios) >= max(2, min_pairs) and ratio_summary(ratios)["spread"] <= target_spread


def refusal(summary: dict, resolution: float, loads: list[float], own_threads: int, max_load: float) -> str | None:
    """Why a timing result must not be published, or None. The spread must not exceed the
    effect, unless it is within `resolution` (the smallest effect the bench claims to resolve:
    an effect of 0 is then "below resolution", not noise); the load the others put on the
    machine (1-minute load average minus this bench's own threads, averaged over the pairs)
    must not exceed `max_load`."""
    others = statistics.fmean(loads) - own_threads if loads else 0.0
    if others > max_load:
        return f"machine busy: load average {statistics.fmean(loads):.2f} ({others:.2f} beyond this bench's " \
               f"{own_threads} threads) > {max_load:.2f}"
    if summary["spread"] > max(abs(summary["effect"]), resolution):
        return f"spread {100 * summary['spread']:.2f}% is larger than the effect {100 * summary['effect']:+.2f}% " \
               f"and the resolution {100 * resolution:.2f}% after {summary['pairs']} pairs"
    return None


def check_quiet(max_load: float | None = None) -> float:
    """Refuse (SystemExit, one line) to start timing on a busy machine; the load it started at."""
    limit = busy_limit() if max_load is None else max_load
    load = os.getloadavg()[0]
    if load > limit:
        raise SystemExit(f"bench: refused: machine busy before starting (load average {load:.2f} > {limit:.2f}); "
                         "nothing written")
    return load


def interleaved(blocks: dict, target_spread: float, min_pairs: int = 6, max_pairs: int = 40,
                max_load: float | None = None) -> dict:
    """Time two sides, {"a": fn, "b": fn} (each fn runs one short block and returns its seconds),
    in pairs of adjacent blocks, a b, b a, a b, ..., so that both see the same load, until
    the spread of the paired ratios b/a is at most `target_spread` or `max_pairs` ran. Returns
    the summary with every block's time and the 1-minute load average after each pair."""
    (na, fa), (nb, fb) = blocks.items()
    times, ratios, loads = {na: [], nb: []}, [], []
    while len(ratios) < max_pairs and not settled(ratios, target_spread, min_pairs):
        order = ((na, fa), (nb, fb)) if len(ratios) % 2 == 0 else ((nb, fb), (na, fa))
        took = {name: fn() for name, fn in order}
        for name, t in took.items():
            times[name].append(t)
        ratios.append(took[nb] / took[na])
        loads.append(os.getloadavg()[0])
    return {**ratio_summary(ratios), "ratios": ratios, "blocks_s": times,
            "loadavg_1_per_pair": [round(x, 2) for x in loads],
            "max_load": busy_limit() if max_load is None else max_load}


def publish_timing(name: str, result: dict, checks: list[dict], resolution: float, own_threads: int,
                   out_dir: Path | None = None) -> int:
    """Write `result` as bench/results/<name> only if no interleaved measurement in `checks`
    is refused; else one line on stderr, nothing written, exit status 1."""
    for c in checks:
        why = refusal(c, resolution, c["loadavg_1_per_pair"], own_threads, c["max_load"])
        if why:
            print(f"bench: refused to write {name}: {why}", file=sys.stderr)
            return 1
    write_json(name, result, out_dir)
    return 0
