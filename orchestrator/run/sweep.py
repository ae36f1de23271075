"""Hydra sweeps (`grow run -m ...`, locally or through hydra/launcher=submitit_slurm).

Each member is an ordinary run in its own directory (`hydra.sweep.dir/<num>`), so it gets
its own MLflow parent run; the swept values are added to it as `sweep/<key>` params with
the sweep directory. When the sweep ends, `SweepSummary` (a Hydra callback, see
conf/config.yaml) writes `<sweep dir>/sweep_summary.json` and prints the members' final
losses and costs.
"""
from __future__ import annotations

import json
from pathlib import Path

from hydra.experimental.callback import Callback

from orchestrator.run.member_values import CONFIG_FILE, ran_values


def sweep_member_params() -> dict:
    """`sweep/<key>: value` for the overrides of this sweep member; {} outside a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
    except Exception:  # not under Hydra (a direct run_schedule call)
        return {}
    if hc.mode != RunMode.MULTIRUN:
        return {}
    sweep_dir = Path(hc.sweep.dir).resolve()
    swept = set(json.loads((sweep_dir / SWEPT_FILE).read_text())) if (sweep_dir / SWEPT_FILE).exists() else None
    params = {"sweep/dir": str(sweep_dir), "sweep/member": hc.job.num}
    for override in hc.overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if swept is None or key in swept:
            params[f"sweep/{key}"] = value
    return params


SWEPT_FILE = "swept_keys.json"  # written at the sweep's start: the keys with several values


def swept_keys(overrides: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]


def collect(sweep_dir: Path) -> dict:
    members = []
    swept_file = Path(sweep_dir) / SWEPT_FILE
    swept = json.loads(swept_file.read_text()) if swept_file.exists() else None
    for d in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()),
                    key=lambda p: int(p.name)):
        overrides_file = d / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_file.exists():
            from omegaconf import OmegaConf
            overrides = list(OmegaConf.load(overrides_file))
        summary_file = d / "summary.json"
        s = json.loads(summary_file.read_text()) if summary_file.exists() else None
        pairs = [o.lstrip("+~").partition("=") for o in overrides]
        launched = {k: v for k, _, v in pairs if swept is None or k in swept}
        ran = ran_values(d, swept or list(launched))  # what it trained, not what it was launched with
        entry = {"member": int(d.name), "run_dir": str(d), "overrides": overrides,
                 "swept": launched if ran is None else {**launched, **ran},
                 "swept_from": "launch arguments (never ran)" if ran is None else CONFIG_FILE,
                 "status": s["status"] if s else "no summary (failed or not run)"}
        if s:
            stages = s["stages"]
            entry.update({"final_val_loss": stages[-1]["val_loss"] if stages else None,
                          "stages": [st["name"] for st in stages],
                          "tokens": s["totals"]["tokens"], "flops": s["totals"]["flops"],
                          "gpu_hours": s["totals"]["gpu_hours"], "cost_usd": s["totals"]["cost_usd"],
                          "mlflow_parent_run_id": s["mlflow"]["parent_run_id"]})
        members.append(entry)
    return {"sweep_dir": str(Path(sweep_dir).resolve()), "members": members}


def print_sweep(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"Sweep {report['sweep_dir']}")
    for col in ("#", "swept", "status", "final val loss", "tokens", "GPU-h", "USD"):
        table.add_column(col)
    for m in report["members"]:
        loss = m.get("final_val_loss")
        table.add_row(str(m["member"]), " ".join(f"{k}={v}" for k, v in m["swept"].items()), m["status"],
                      f"{loss:.6f}" if loss is not None else "-", str(m.get("tokens", "-")),
                      f"{m['gpu_hours']:.4f}" if "gpu_hours" in m else "-",
                      f"{m['cost_usd']:.4f}" if "cost_usd" in m else "-")
    Console(width=140).print(table)


class SweepSummary(Callback):
    def on_job_start(self, config, **kwargs) -> None:
        """Hydra's sweeper saved <sweep dir>/multirun.yaml, the composed config, unmasked, just
        before the first member: a secret from a config file (a tracking URI's password) is
        masked there before the member runs. The command line's own secrets never get there
        (orchestrator.secrets.overrides_without_secrets)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        from omegaconf import OmegaConf

        from orchestrator.atomic import write_bytes_atomic
        from orchestrator.secrets import redact_config
        path = Path(config.hydra.sweep.dir) / "multirun.yaml"
        if path.exists():
            saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            masked = redact_config(saved)
            if masked != saved:
                write_bytes_atomic(path, OmegaConf.to_yaml(OmegaConf.create(masked)).encode())

    def on_multirun_start(self, config, **kwargs) -> None:
        """Note which keys are swept (members log them as params), and create the MLflow store
        and experiment once, before members start at the same time (two processes creating
        one sqlite schema at once fail)."""
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from orchestrator.atomic import write_json_atomic
        write_json_atomic(sweep_dir / SWEPT_FILE, swept_keys(list(config.hydra.overrides.task)))
        t = config.get("tracking")
        if not t or not t.get("enabled"):
            return
        from orchestrator.secrets import redact_text
        from orchestrator.tracking.mlflow_tracker import experiment_id, open_client, tracking_uri
        try:
            experiment_id(open_client(tracking_uri(t.get("uri"))), t.experiment)
        except Exception as e:  # an outage: each member's tracker says so and keeps its metrics
            print(f"warning: MLflow: the sweep's experiment was not created ({redact_text(str(e).splitlines()[0])})")

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        report = collect(sweep_dir)
        from orchestrator.atomic import write_json_atomic
        write_json_atomic(sweep_dir / "sweep_summary.json", report)
        print_sweep(report)
        print(f"sweep summary: {sweep_dir / 'sweep_summary.json'}")
