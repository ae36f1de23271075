"""Secrets kept out of what a run writes and prints; the tracking store raced on, corrupt or
down; a metrics.jsonl cut mid-line (issue 12). Real MLflow (sqlite stores), in-process
except where two processes are the point."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.config.schema import TrackingConfig
from orchestrator.secrets import is_secret_name, redact_config, redact_text, redact_url, secret_values
from orchestrator.tracking.mlflow_tracker import MlflowTracker
from orchestrator.tracking.report import MetricsLog, build_summary
from orchestrator.budget.ledger import Ledger

PASSWORD = "hunter2-Pa55word"


@pytest.mark.parametrize("name", ["HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "db_password", "apiKey", "API_KEY",
                                  "aws_secret_access_key", "AWS_ACCESS_KEY_ID", "GITHUB_TOKEN", "client_secret",
                                  "tracking.token", "private_key", "MY_API_TOKEN", "credentials"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["tokens", "max_tokens", "budget.max_tokens", "train_tokens", "step_tokens",
                                  "data.tokenizer.kind", "data.tokenizer.vocab_size", "TOKENIZERS_PARALLELISM",
                                  "eos_token", "pad_token", "keep", "author", "cluster.name", "monkey",
                                  "tracking.uri", "passage"])
def test_names_that_are_not_secrets(name):
    assert not is_secret_name(name)


def test_url_credentials_are_masked_and_the_rest_kept():
    assert redact_url(f"http://alice:{PASSWORD}@mlflow.example:5000/x") == "http://alice:***@mlflow.example:5000/x"
    assert redact_url(f"postgresql://u:{PASSWORD}@db/mlflow?sslmode=require&password={PASSWORD}") == \
        "postgresql://u:***@db/mlflow?sslmode=require&password=***"
    assert redact_url("sqlite:////tmp/a:b/mlflow.db") == "sqlite:////tmp/a:b/mlflow.db"
    assert redact_url("http://host/?max_tokens=5") == "http://host/?max_tokens=5"


def test_redact_config_by_key_by_environment_value_and_by_url():
    env = {"MY_API_TOKEN": "tok-123456789", "TOKENIZERS_PARALLELISM": "false", "HOME": "/root"}
    cfg = {"tracking": {"uri": f"https://bob:{PASSWORD}@h/", "experiment": "x-tok-123456789"},
           "budget": {"max_tokens": 1000}, "data": {"tokenizer": {"kind": "byte"}},
           "submit": {"setup": ["export HF_TOKEN=tok-123456789"]}, "db_password": "pw", "seed": 3}
    out = redact_config(cfg, secret_values(env))
    assert out == {"tracking": {"uri": "https://bob:***@h/", "experiment": "x-***"},
                   "budget": {"max_tokens": 1000}, "data": {"tokenizer": {"kind": "byte"}},
                   "submit": {"setup": ["export HF_TOKEN=***"]}, "db_password": "***", "seed": 3}
    assert redact_config(out, secret_values(env)) == out  # redacting twice changes nothing
    assert redact_text("false", secret_values(env)) == "false"  # TOKENIZERS_* is not a secret


def _tracker(tmp_path, uri, params=None, console=None, flush=60.0):
    return MlflowTracker(TrackingConfig(uri=uri, flush_every_s=flush), tmp_path, "t",
                         params or {}, console or Console(file=io.StringIO()))


def test_a_password_in_the_tracking_uri_is_never_written_or_printed(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "tok-123456789")
    uri = f"http://alice:{PASSWORD}@127.0.0.1:9/"  # nothing listens: the outage path
    out = io.StringIO()
    tracker = _tracker(tmp_path, uri, {"tracking.uri": uri, "cluster.name": "tok-123456789",
                                       "budget.max_tokens": 512, "data.tokenizer.kind": "byte"},
                       Console(file=out, width=300))
    tracker.finish("FINISHED")
    assert tracker.uri == uri  # it connects with the password ...
    saved = (tmp_path / "tracking.json").read_text()
    summary = json.dumps(build_summary([], Ledger(), tracker.info, "complete"))
    for text in (saved, summary, out.getvalue()):  # ... and writes or prints it nowhere
        assert PASSWORD not in text and "tok-123456789" not in text
    assert "alice:***@127.0.0.1:9" in out.getvalue() and "unreachable" in out.getvalue()
    params = json.loads(saved)["pending_params"][""]
    assert params == {"tracking.uri": "http://alice:***@127.0.0.1:9/", "cluster.name": "***",
                      "budget.max_tokens": 512, "data.tokenizer.kind": "byte"}  # tokens are not secrets
    again = _tracker(tmp_path, uri)  # a resume gets the password back from the config
    assert again.uri == uri and again.info["tracking_uri"] == "http://alice:***@127.0.0.1:9/"


def test_a_corrupt_mlflow_db_is_a_tracking_outage(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a sqlite database" * 100)
    out = io.StringIO()
    log = MetricsLog(tmp_path / "metrics.jsonl")
    tracker = _tracker(tmp_path, f"sqlite:///{db}", console=Console(file=out, width=300), flush=0.01)
    log.write("s1", 1, {"train/loss": 2.5})
    tracker.stage_run("s1", {"seed": 0})
    tracker.flush(force=True)
    tracker.finish("FINISHED")
    log.close()
    assert "unreachable" in out.getvalue() and "not a database" in out.getvalue()
    assert "1 metric records not sent" in out.getvalue()
    assert MetricsLog.read(tmp_path / "metrics.jsonl")[0]["train/loss"] == 2.5
    assert json.loads((tmp_path / "tracking.json").read_text())["sent_offset"] == 0  # sent when it is back


RACER = textwrap.dedent("""
    import io, sys
    from pathlib import Path
    from rich.console import Console
    from orchestrator.config.schema import TrackingConfig
    from orchestrator.tracking.mlflow_tracker import MlflowTracker
    run_dir = Path(sys.argv[2]); run_dir.mkdir()
    out = io.StringIO()
    t = MlflowTracker(TrackingConfig(uri=sys.argv[1]), run_dir, run_dir.name, {"seed": 1}, Console(file=out))
    print(t.info["parent_run_id"], repr(out.getvalue()))
""")


def test_runs_starting_at_once_on_a_fresh_sqlite_store_all_connect(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(tmp_path / f"run{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    for (stdout, stderr), p in zip(results, procs):
        assert p.returncode == 0, stderr[-2000:]
        run_id, warnings = stdout.split(" ", 1)
        assert run_id != "None" and warnings.strip() == "''", stdout  # online, no outage
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("growth")
    assert len(client.search_runs([exp.experiment_id])) == 3


def test_a_torn_last_line_is_cut_on_open_so_the_next_record_survives(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write("s1", 1, {"train/loss": 3.0})
    log.write("s1", 2, {"train/loss": 2.9})
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"stage": "s1", "step": 3, "train/lo')  # killed mid-write
    log = MetricsLog(path)
    assert path.read_bytes() == whole
    log.write("s2", 0, {"growth/val_loss_before": 2.8, "growth/val_loss_after": 2.8})
    log.close()
    records = MetricsLog.read(path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["growth/val_loss_after"] == 2.8
    path.write_bytes(b'{"stage": "s1", "st')  # nothing whole at all
    MetricsLog(path).close()
    assert path.read_bytes() == b""


def test_the_reader_skips_torn_and_foreign_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "s1", "step": 1, "train/loss": 3.0}\n{"stage": "s1", "st\n[1, 2]\n'
                    '{"no": "step"}\n{"stage": "s1", "step": 2, "train/loss": 2.0}\n')
    assert [r["step"] for r in MetricsLog.read(path)] == [1, 2]
    tracker = _tracker(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    records, end = tracker._pending()
    assert [r["step"] for r in records] == [1, 2] and end == path.stat().st_size
