"""MLflow tracking: one parent run per schedule run, one child run per stage.

Run ids are kept in `<run_dir>/tracking.json`, so a resumed run continues the same MLflow
runs. Metrics are buffered and sent in batches; after a resume, points at steps that the
run already logged are dropped, so redone steps are not logged twice.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from .checkpoint import write_json_atomic
from .config import TrackingConfig

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request


def default_tracking_uri() -> str:
    """MLflow's own default store, made absolute so every process agrees on it."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class NullTracker:
    """Tracking switched off: same interface, records nothing."""

    info: dict = {}

    def stage_run(self, name: str, params: dict) -> str:
        return ""

    def log(self, run: str, step: int, metrics: dict) -> None:
        pass

    def flush(self, force: bool = False) -> None:
        pass

    def artifact(self, run: str | None, path: Path) -> None:
        pass

    def finish_stage(self, name: str) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class MlflowTracker(NullTracker):
    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, params: dict):
        import mlflow  # slow import: only when tracking is on
        from mlflow.tracking import MlflowClient

        self.cfg, self.path = cfg, Path(run_dir) / "tracking.json"
        saved = json.loads(self.path.read_text()) if self.path.exists() else None
        uri = (saved or {}).get("tracking_uri") or cfg.uri or default_tracking_uri()
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        self._buffer: dict[str, list] = {}
        self._last_logged: dict[str, dict[str, int]] = {}
        self._pending: list = []
        self._last_flush = time.monotonic()
        if saved:
            self.info = saved
            for run_id in [saved["parent_run_id"], *saved["stage_run_ids"].values()]:
                self._resume(run_id)
        else:
            run = self.client.create_run(exp_id, run_name=run_name, tags={"run_dir": str(run_dir)})
            self.info = {"tracking_uri": uri, "experiment": cfg.experiment, "experiment_id": exp_id,
                         "parent_run_id": run.info.run_id, "stage_run_ids": {}}
            self._params(run.info.run_id, params)
            self._save()

    def _save(self) -> None:
        write_json_atomic(self.path, self.info)

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _resume(self, run_id: str) -> None:
        """Mark a run RUNNING again and note the last step of each metric it holds."""
        self.client.update_run(run_id, status="RUNNING")
        last = {}
        for key in self.client.get_run(run_id).data.metrics:
            history = self.client.get_metric_history(run_id, key)
            last[key] = max(m.step for m in history)
        self._last_logged[run_id] = last

    def stage_run(self, name: str, params: dict) -> str:
        ids = self.info["stage_run_ids"]
        if name not in ids:
            run = self.client.create_run(self.info["experiment_id"], run_name=name,
                                         tags={"mlflow.parentRunId": self.info["parent_run_id"]})
            ids[name] = run.info.run_id
            self._params(run.info.run_id, params)
            self._save()
        return ids[name]

    def log(self, run: str, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        last = self._last_logged.get(run, {})
        buf = self._buffer.setdefault(run, [])
        for key, value in metrics.items():
            if step > last.get(key, -1):
                buf.append(Metric(key, float(value), now, step))
        self.flush()

    def flush(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_flush < self.cfg.flush_every_s:
            return
        self._last_flush = time.monotonic()
        for run_id, metrics in self._buffer.items():
            while metrics:
                chunk = metrics[:MAX_BATCH]
                try:
                    self.client.log_batch(run_id, metrics=chunk, synchronous=True)
                except Exception as e:  # keep training; the buffer is retried at the next flush
                    warnings.warn(f"MLflow logging failed, will retry: {e}", stacklevel=2)
                    return
                del metrics[:MAX_BATCH]

    def artifact(self, run: str | None, path: Path) -> None:
        if Path(path).exists():
            self.client.log_artifact(run or self.info["parent_run_id"], str(path))

    def finish(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED; the parent and any still-running child."""
        self.flush(force=True)
        for run_id in [*self.info["stage_run_ids"].values(), self.info["parent_run_id"]]:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status)

    def finish_stage(self, name: str) -> None:
        self.flush(force=True)
        self.client.set_terminated(self.info["stage_run_ids"][name], "FINISHED")


def make_tracker(cfg: TrackingConfig, run_dir: Path, run_name: str, params: dict):
    if not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_dir, run_name, params)
