"""The tracking store's checks (registered with orchestrator.config.checks): a supported
URI scheme, and on the machine a run starts on, a local store it can write."""
from __future__ import annotations

from orchestrator.config.checks import check, check_creatable_dir
from orchestrator.config.errors import ConfigError
from orchestrator.schedule import Schedule
from orchestrator.secrets import redact_text
from orchestrator.tracking.mlflow_tracker import sqlite_path, tracking_uri

TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "databricks")


@check("settings")
def uri_scheme(schedule: Schedule) -> None:
    uri = schedule.cfg.tracking.uri
    if uri is not None:
        scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
        if scheme not in TRACKING_SCHEMES:
            raise ConfigError("tracking.uri", f"{redact_text(uri)!r} has no supported scheme; "
                                              f"allowed: {', '.join(TRACKING_SCHEMES)}")


@check("machine")
def local_store(schedule: Schedule) -> None:
    """A local store (sqlite:///path, file:path) whose directory is missing would fail at
    the first metric; an unreachable server is an outage the run survives, not checked.
    The store given by $MLFLOW_TRACKING_URI is refused under tracking.uri, the key it stands in for."""
    t = schedule.cfg.tracking
    if not t.enabled:
        return
    uri = tracking_uri(t.uri)  # $MLFLOW_TRACKING_URI too: a store the run would fail on
    if uri.startswith("sqlite:"):
        db = sqlite_path(uri)
        if db is None:
            raise ConfigError("tracking.uri", "a sqlite store needs a file: sqlite:///relative/path.db or "
                                              "sqlite:////absolute/path.db")
        if not db.expanduser().absolute().parent.is_dir():
            raise ConfigError("tracking.uri", f"the directory of {db} does not exist")
        if db.is_dir():
            raise ConfigError("tracking.uri", f"{db} is a directory, not a database file")
    elif uri.startswith("file:"):
        check_creatable_dir("tracking.uri", uri[len("file:"):].removeprefix("//"))
