"""MLflow tracking: one parent run per schedule run, one child run per stage.

Metrics reach MLflow from `metrics.jsonl`, the run's on-disk record: every point is
written there first, and the tracker sends what is new since the offset it last sent
(kept in `tracking.json` with the run ids). So a tracking server that is down at start or
dies mid-run costs nothing: training goes on, and the points go out when it is back (or
at the next `grow run` on the directory). Points at steps MLflow already holds for a key
are dropped, so neither a resend nor a step redone after a crash is logged twice.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from orchestrator.atomic import write_json_atomic
from orchestrator.config.schema import TrackingConfig
from orchestrator.secrets import REDACTED, redact_config, redact_text, redact_url

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request
PARENT_KEYS = re.compile(r"^(train/loss|val/.*|budget/.*|growth/val_loss_.*|predict/.*)$")


def default_tracking_uri() -> str:
    """MLflow's own default store, made absolute so every process agrees on it."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def tracking_uri(configured: str | None) -> str:
    """The store a run uses, as MLflow chooses it: tracking.uri, else $MLFLOW_TRACKING_URI,
    else the default sqlite file."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores or in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path("/" + path.lstrip("/")) if uri.startswith("sqlite:////") else Path(path)


def open_client(uri: str):
    """An MlflowClient; it creates (or migrates) a sqlite store's tables as it opens it.
    Two runs creating one fresh mlflow.db at once race on that (one fails with "duplicate
    column name"), so creation is serialized by a lock file beside the database. Raises
    whatever the store raises (unreachable, corrupt): callers treat that as an outage."""
    from mlflow.tracking import MlflowClient

    # Fail fast instead of MLflow's minutes of retries with backoff (an unreachable server
    # held a sweep 4 minutes before it trained): every caller retries later or goes without.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if redact_url(uri) != uri:  # MLflow prints "View run ... at: <URI>", password and all, as runs end
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(uri)
    fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        return MlflowClient(uri)
    finally:
        os.close(fd)


def experiment_id(client, name: str) -> str:
    """The id of the experiment `name`, created if missing. MLflow stores names in plain text
    for anyone who can read the store, so a secret in the name (`${oc.env:...}`) is masked
    first: every caller (runs, sweeps, searches) gets the same masked experiment."""
    name = redact_text(name)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another run created it a moment ago
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class NullTracker:
    """Tracking switched off: same interface, records nothing."""

    info: dict = {}
    written_info: dict = {}

    def stage_run(self, name: str, params: dict) -> str | None:
        return None

    def run_id(self, stage: str) -> str | None:
        return None

    def flush(self, force: bool = False) -> None:
        pass

    def artifact(self, path: Path) -> None:
        pass

    def finish_stage(self, name: str) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class MlflowTracker(NullTracker):
    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, params: dict,
                 console: Console | None = None):
        self.cfg, self.console = cfg, console or Console(stderr=True)
        self.path, self.metrics_path = Path(run_dir) / "tracking.json", Path(run_dir) / "metrics.jsonl"
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        # The run keeps the store it started with. tracking.json (like everything the run
        # writes) holds the URI without its password, so a saved URI with one masked is
        # completed from the configured URI, which carries it.
        saved_uri = saved.get("tracking_uri")
        if saved_uri and REDACTED not in saved_uri:
            self.uri = saved_uri
        else:
            self.uri = tracking_uri(cfg.uri)
        # pending_params: run key ("" = parent, else stage) -> params not logged yet; kept on
        # disk so runs whose creation the store missed are created by a later process
        self.info = {"experiment_id": None, "parent_run_id": None, "stage_run_ids": {}, "sent_offset": 0,
                     "pending_params": {"": redact_config(params)}, **saved,
                     "experiment": cfg.experiment,  # from the config: a written copy may be masked
                     "tracking_uri": redact_url(self.uri)}
        self._params = self.info["pending_params"]
        self.client = None  # opened by _connect: a store that cannot be opened is an outage
        self._run_name = run_name
        self._last_step: dict[str, dict[str, int]] | None = None  # run id -> key -> step
        self._online, self._next_try, self._last_flush, self._warned = False, 0.0, 0.0, False
        self._save()
        if self.info["tracking_uri"] != self.uri:
            self.console.print(f"note: the credentials in {self.info['tracking_uri']} are masked in everything grow "
                               "writes and prints; MLflow also reads them from MLFLOW_TRACKING_USERNAME and "
                               "MLFLOW_TRACKING_PASSWORD, which keeps them off the command line")
        self._connect()

    # -- connection ------------------------------------------------------------------
    def _save(self) -> None:
        write_json_atomic(self.path, self.written_info)

    @property
    def written_info(self) -> dict:
        """`info` as the run's files hold it (tracking.json, summary.json, checkpoints):
        secrets masked (an experiment named by a secret environment value, say)."""
        return redact_config(self.info)

    def _offline(self, error: Exception) -> None:
        self._online, self._last_step = False, None
        self._next_try = time.monotonic() + max(5.0, 2 * self.cfg.flush_every_s)
        if not self._warned:
            self._warned = True
            first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            self.console.print(f"[yellow]warning:[/] MLflow at {self.info['tracking_uri']} is unreachable "
                               f"({escape(redact_text(first))}); training goes on, metrics stay in "
                               f"{self.metrics_path} and are sent when it is back")

    def _connect(self) -> bool:
        """Create or reopen the experiment and runs; note each run's last logged steps."""
        if self._online:
            return True
        if time.monotonic() < self._next_try:
            return False
        try:
            if self.client is None:
                self.client = open_client(self.uri)
            info = self.info
            if info["experiment_id"] is None:
                info["experiment_id"] = experiment_id(self.client, info["experiment"])
            if info["parent_run_id"] is None:
                run = self.client.create_run(info["experiment_id"], run_name=redact_text(self._run_name),
                                             tags={"run_dir": redact_text(str(self.path.parent))})
                info["parent_run_id"] = run.info.run_id
                self._save()
            for name in [n for n in self._params if n and n not in info["stage_run_ids"]]:
                run = self.client.create_run(info["experiment_id"], run_name=redact_text(name),
                                             tags={"mlflow.parentRunId": info["parent_run_id"]})
                info["stage_run_ids"][name] = run.info.run_id
                self._save()
            for key in list(self._params):
                run_id = info["parent_run_id"] if key == "" else info["stage_run_ids"][key]
                self._log_params(run_id, self._params[key])
                del self._params[key]
                self._save()
            self._last_step = {}
            for run_id in [info["parent_run_id"], *info["stage_run_ids"].values()]:
                run = self.client.get_run(run_id)
                if run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                self._last_step[run_id] = self._last_steps(run)
        except Exception as e:  # any failure to reach the store: stay offline, retry later
            self._offline(e)
            return False
        if self._warned:
            self.console.print(f"MLflow at {self.info['tracking_uri']} is reachable again")
            self._warned = False
        self._online = True
        return True

    def _last_steps(self, run) -> dict[str, int]:
        """The highest logged step of each metric. MLflow's latest-metric entities carry it
        (one row per key), so a long run does not re-read its whole history on resume."""
        latest = getattr(run.data, "_metric_objs", None)
        if latest is not None:
            return {m.key: m.step for m in latest}
        return {key: max(m.step for m in self.client.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics}

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param
        existing = self.client.get_run(run_id).data.params  # params cannot be overwritten
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    # -- runs ------------------------------------------------------------------------
    def stage_run(self, name: str, params: dict) -> str | None:
        if name not in self.info["stage_run_ids"] and name not in self._params:
            self._params[name] = redact_config(params)
            self._save()
            if self._online:
                self._online = False  # reconnect creates the run and logs its params
                self._next_try = 0.0
            self._connect()
        return self.run_id(name)

    def run_id(self, stage: str) -> str | None:
        return self.info["stage_run_ids"].get(stage)

    # -- metrics ---------------------------------------------------------------------
    def _pending(self) -> tuple[list[dict], int]:
        """Complete lines of metrics.jsonl after the sent offset, and the offset after them."""
        start = self.info["sent_offset"]
        if not self.metrics_path.exists():
            return [], start
        with open(self.metrics_path, "rb") as f:
            f.seek(start)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next flush
        records = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a kill (MetricsLog drops such tails on open)
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and "stage" in rec:
                records.append(rec)
        return records, start + end

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.cfg.flush_every_s:
            return
        self._last_flush = now
        if not self._connect():
            return
        from mlflow.entities import Metric
        records, end = self._pending()
        ids, parent = self.info["stage_run_ids"], self.info["parent_run_id"]
        batches: dict[str, list] = {}
        stamp = int(time.time() * 1000)
        for rec in records:
            step, stage = rec["step"], rec["stage"]
            for key, value in rec.items():
                if key in ("stage", "step", "time"):
                    continue
                targets = [ids.get(stage)] + ([parent] if PARENT_KEYS.match(key) else [])
                for run_id in filter(None, targets):
                    last = self._last_step.setdefault(run_id, {})
                    if step > last.get(key, -1):
                        last[key] = step
                        batches.setdefault(run_id, []).append(
                            Metric(key, float(value), int(rec.get("time", stamp / 1000) * 1000), step))
        try:
            for run_id, metrics in batches.items():
                for i in range(0, len(metrics), MAX_BATCH):
                    self.client.log_batch(run_id, metrics=metrics[i:i + MAX_BATCH], synchronous=True)
        except Exception as e:
            self._offline(e)  # resend from the old offset; the last-step check drops repeats
            return
        self.info["sent_offset"] = end
        self._save()

    # -- ends ------------------------------------------------------------------------
    def artifact(self, path: Path) -> None:
        if path and Path(path).exists() and self._connect():
            try:
                self.client.log_artifact(self.info["parent_run_id"], str(path))
            except Exception as e:
                self._offline(e)

    def _terminate(self, run_id: str, status: str) -> None:
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status)

    def finish_stage(self, name: str) -> None:
        self.flush(force=True)
        if self._online and name in self.info["stage_run_ids"]:
            try:
                self._terminate(self.info["stage_run_ids"][name], "FINISHED")
            except Exception as e:
                self._offline(e)

    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED, for the parent and every child still running. If the
        store is unreachable the runs stay RUNNING and unsent points stay on disk."""
        self.flush(force=True)
        if not self._online:
            records, _ = self._pending()
            self.console.print(f"[yellow]warning:[/] {len(records)} metric records not sent to MLflow yet; "
                               "`grow run` on this run directory sends them when the store is back")
            return
        try:
            for run_id in [*self.info["stage_run_ids"].values(), self.info["parent_run_id"]]:
                self._terminate(run_id, status)
        except Exception as e:
            self._offline(e)


def make_tracker(cfg: TrackingConfig, run_dir: Path, run_name: str, params: dict,
                 console: Console | None = None):
    if not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_dir, run_name, params, console)
