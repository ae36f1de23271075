"""`grow status run_dir=DIR [format=table|json]`: a submitted run's stages (job ids, state,
requeues, tokens, spend), as orchestrator.slurm.status.describe finds them."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.exits import EXIT_CONFIG, fail
from orchestrator.slurm.status import describe


def status_command(args: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = [a for a in args if "=" not in a] + [k for k in opts if k not in ("run_dir", "format")]
    if unknown or "run_dir" not in opts:
        return fail(EXIT_CONFIG, "usage: grow status run_dir=DIR [format=table|json]")
    run_dir = Path(opts["run_dir"]).expanduser().resolve()
    if not run_dir.is_dir():
        return fail(EXIT_CONFIG, f"{run_dir} is not a directory")
    info = describe(run_dir)
    if opts.get("format", "table") == "json":
        print(json.dumps(info, indent=1))
        return 0
    table = Table(title=f"{run_dir}")
    for col in ("#", "stage", "jobs", "nodes", "state", "requeues", "tokens", "GPU-h", "USD", "lost s"):
        table.add_column(col)
    for r in info["stages"]:
        tokens = f"{r['tokens']}" + (f"/{r['tokens_target']}" if r["tokens_target"] else "")
        requeues = str(r["requeues"]) + (f" ({'; '.join(r['requeue_reasons'])})" if r["requeue_reasons"] else "")
        table.add_row(str(r["index"]), r["stage"], ",".join(r["job_ids"]) or "-", str(r["nodes"] or "-"),
                      r["state"], requeues, tokens, f"{r['gpu_hours']:.4f}", f"{r['cost_usd']:.4f}",
                      f"{r['lost_s']:.0f}")
    console = Console(width=160)
    console.print(table)
    console.print(f"running now: {', '.join(info['running']) or 'nothing'}; "
                  f"spent ${info['spent_usd']:.4f}; summary: {info['summary'] or 'none yet'}")
    return 0
