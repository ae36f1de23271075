"""Secrets stay out of everything a command writes and prints (issue 26): a password in
tracking.uri and a secret environment value in tracking.experiment (or cluster.name, or a
bad value), through `grow run`,
`grow run -m`, `grow search`, `grow predict`, `grow plan`, `grow submit`, `grow status` and
a refusal. One helper greps every file the command wrote, the MLflow server's store and
artifacts, and the console for them. The server is real MLflow behind a proxy that refuses
any request without the password, so a masked URI reaching MLflow would fail the test."""
from __future__ import annotations

import base64
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.secrets import overrides_without_secrets

from ..conftest import grow_in_process
from ..faults.test_tracking_outage import MlflowServer, _free_port

pytestmark = pytest.mark.slow

USER, PASSWORD = "alice", "Hunter2-Sweep-Pa55"
TOKEN_VAR, TOKEN = "SWEEP_TEST_API_TOKEN", "tok-7f3a9c1e55"  # a secret environment value
SECRETS = (PASSWORD, TOKEN)
EXPERIMENT = "e-${oc.env:" + TOKEN_VAR + "}"
PROXY = ["schedule=proxy", "schedule.stages.0.tokens=2048", "schedule.stages.0.shape.hidden=32",
         "schedule.stages.0.shape.ffn=128", "schedule.stages.0.shape.heads=2", "engine.threads=1",
         "schedule.stages.0.lr.warmup_steps=1", "train.eval_every_steps=4"]


class PasswordGate:
    """A reverse proxy in front of the MLflow server: requests without `USER:PASSWORD` as
    HTTP basic credentials get 401 (counted), the others go through."""

    def __init__(self, upstream: str):
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        gate = self
        self.passed, self.refused = 0, 0

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                if self.headers.get("Authorization") != expected:
                    gate.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                gate.passed += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                request = urllib.request.Request(upstream + self.path, data=body, headers=headers,
                                                 method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=60) as r:
                        status, payload, kind = r.status, r.read(), r.headers.get("Content-Type")
                except urllib.error.HTTPError as e:
                    status, payload, kind = e.code, e.read(), e.headers.get("Content-Type")
                self.send_response(status)
                if kind:
                    self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def uri(self, credentials: bool = True) -> str:
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{self.port}" if credentials else f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    mlflow = MlflowServer(root)
    mlflow.start()
    mlflow.root, mlflow.gate = root, PasswordGate(mlflow.uri)
    yield mlflow
    mlflow.gate.server.shutdown()
    mlflow.kill()


@pytest.fixture
def env(monkeypatch):
    """The secret environment value set; what the commands add to the environment
    (GROW_SECRET_<n>, MLflow's retry settings) removed after the test."""
    before = dict(os.environ)
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    yield monkeypatch
    for name in set(os.environ) - set(before):
        del os.environ[name]


def assert_secrets_kept(console: str, *places: Path) -> None:
    """No secret in the console or in any file under `places` (bytes, every file: yaml,
    json, logs, pickles, sqlite stores)."""
    for secret in SECRETS:
        assert secret not in console, console[max(0, console.find(secret) - 300):console.find(secret) + 100]
        leaks = [str(p) for place in places for p in Path(place).rglob("*")
                 if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret!r} written to {leaks}"


def grow(capfd, *args: str) -> tuple[int, str]:
    code = grow_in_process(*args)
    out = capfd.readouterr()
    return code, out.out + out.err


def tracked(server, data_cache, credentials: bool = True) -> list[str]:
    return [*PROXY, f"data.cache_dir={data_cache}", f"tracking.uri={server.gate.uri(credentials)}",
            f"tracking.experiment={EXPERIMENT}"]


def runs_in(server, experiment: str) -> list:
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, [e.name for e in client.search_experiments()]
    return client.search_runs([exp.experiment_id])


# -- the overrides a sweep hands to Hydra -------------------------------------------------

def test_secrets_leave_a_sweeps_overrides_as_environment_references():
    environ = {"HF_TOKEN": "hf_abcdefgh", "GROW_SECRET_1": "taken-by-another"}
    args = ["-m", f"tracking.uri=http://u:{PASSWORD}@pwhost:5000", "seed=1,2",
            "tracking.experiment=x-hf_abcdefgh", "data.path=postgresql://u:pw@pwdb/x?password=zz9999&a=1"]
    out = overrides_without_secrets(args, environ)
    assert out == ["-m", "tracking.uri=http://u:${oc.env:GROW_SECRET_2}@pwhost:5000", "seed=1,2",
                   "tracking.experiment=x-${oc.env:HF_TOKEN}",  # an existing secret variable is reused
                   "data.path=postgresql://u:${oc.env:GROW_SECRET_3}@pwdb/x?password=${oc.env:GROW_SECRET_4}&a=1"]
    assert environ["GROW_SECRET_2"] == PASSWORD and environ["GROW_SECRET_3"] == "pw"  # short: by position only
    assert environ["GROW_SECRET_4"] == "zz9999" and environ["GROW_SECRET_1"] == "taken-by-another"
    assert overrides_without_secrets(out, environ) == out  # references stay references
    assert overrides_without_secrets(args, environ) == out  # the same command line, the same names


# -- commands -----------------------------------------------------------------------------

def test_grow_search_keeps_secrets_and_its_runs_reach_mlflow(tmp_path, data_cache, server, env, capfd):
    sweep = tmp_path / "search"
    passed = server.gate.passed
    code, out = grow(capfd, "search", "schedule.stages.0.lr.peak=1e-3,2e-3", *tracked(server, data_cache),
                     f"hydra.sweep.dir={sweep}")
    assert code == 0, out[-3000:]
    assert "unreachable" not in out and "not logged" not in out, out[-3000:]
    assert "MLFLOW_TRACKING_PASSWORD" in out  # the way to keep it off the command line
    assert_secrets_kept(out, tmp_path, server.root)
    assert server.gate.refused == 0 and server.gate.passed > passed  # the real password reached MLflow
    runs = runs_in(server, "e-***")  # the experiment's name, masked
    searches = [r for r in runs if r.data.tags.get("grow.kind") == "search"]
    members = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == searches[-1].info.run_id]
    assert len(members) == 2 and all(r.data.params["tracking.uri"] == f"http://{USER}:***@127.0.0.1:{server.gate.port}"
                                     for r in members)
    assert {r.data.params["tracking.experiment"] for r in members} == {"e-***"}


def test_grow_run_single_and_sweep_keep_secrets(tmp_path, data_cache, server, env, capfd):
    code, out = grow(capfd, "run", *tracked(server, data_cache), f"hydra.run.dir={tmp_path / 'single'}")
    assert code == 0, out[-3000:]
    code, swept = grow(capfd, "run", "-m", "seed=1,2", *tracked(server, data_cache),
                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, swept[-3000:]
    assert "GROW_SECRET_1" in (tmp_path / "sweep" / "multirun.yaml").read_text()  # a reference in its place
    conf = tmp_path / "conf"  # a secret in a config file, not on the command line
    (conf / "tracking").mkdir(parents=True)
    (conf / "tracking" / "guarded.yaml").write_text(f"enabled: true\nuri: {server.gate.uri()}\n")
    code, from_file = grow(capfd, "run", "-m", "--config-dir", str(conf), "tracking=guarded", "seed=1,2",
                           *PROXY, f"data.cache_dir={data_cache}", f"hydra.sweep.dir={tmp_path / 'from-file'}")
    assert code == 0 and "unreachable" not in from_file, from_file[-3000:]
    assert f"{USER}:***@" in (tmp_path / "from-file" / "multirun.yaml").read_text()
    swept += from_file
    (conf / "tracking" / "guarded.yaml").unlink()  # the user's own copy
    assert_secrets_kept(out + swept, tmp_path, server.root)
    assert server.gate.refused == 0
    names = {r.info.run_name for r in runs_in(server, "e-***")}
    assert {"proxy:single", "proxy:0", "proxy:1"} <= names
    code, status = grow(capfd, "status", f"run_dir={tmp_path / 'single'}")
    assert code == 0 and "proxy" in status
    assert_secrets_kept(status)


def test_grow_predict_keeps_secrets(tmp_path, data_cache, server, env, capfd):
    code, out = grow(capfd, "predict", "predict.widths=16,32,48", "predict.keep_unlawful=true",
                     *tracked(server, data_cache),
                     f"hydra.sweep.dir={tmp_path / 'predict'}")
    assert code == 0, out[-3000:]
    assert (tmp_path / "predict" / "loss_fit.json").exists()
    assert_secrets_kept(out, tmp_path, server.root)
    assert server.gate.refused == 0


def test_plan_submit_and_refusals_echo_no_secret(tmp_path, data_cache, server, env, capfd):
    env.chdir(tmp_path)  # grow plan writes ./plans/<schedule>/<time>/plan.json
    named = "cluster.name=${oc.env:" + TOKEN_VAR + "}"  # a secret where grow prints and writes it
    code, plan = grow(capfd, "plan", *tracked(server, data_cache), named)
    assert code == 0 and "on cluster ***" in plan, plan[-2000:]
    code, refused = grow(capfd, "submit", *tracked(server, data_cache), "submit.dry_run=true",
                         f"hydra.run.dir={tmp_path / 'refused'}")
    assert code == 2 and "MLFLOW_TRACKING_USERNAME" in refused, refused[-2000:]  # no password in an sbatch script
    code, submit = grow(capfd, "submit", *tracked(server, data_cache, credentials=False), named,
                        "submit.dry_run=true", f"hydra.run.dir={tmp_path / 'submitted'}")
    assert code == 0 and "#SBATCH --job-name=grow-submitted-0-proxy" in submit, submit[-2000:]
    code, bad_scheme = grow(capfd, "run", *PROXY, f"tracking.uri=htp://{USER}:{PASSWORD}@host:5000")
    assert code == 2 and f"htp://{USER}:***@host:5000" in bad_scheme, bad_scheme
    code, bad_value = grow(capfd, "run", *PROXY, "schedule.stages.0.tokens=${oc.env:" + TOKEN_VAR + "}")
    assert code == 2 and "Value '***'" in bad_value, bad_value
    code, bad_sweep = grow(capfd, "run", "-m", "seed=1,2", *PROXY, f"tracking.uri=htp://{USER}:{PASSWORD}@host",
                           f"hydra.sweep.dir={tmp_path / 'bad-sweep'}")
    assert code == 2, bad_sweep
    assert_secrets_kept(plan + refused + submit + bad_scheme + bad_value + bad_sweep, tmp_path)


def test_an_unreachable_store_costs_a_sweep_seconds(tmp_path, data_cache, env, capfd):
    """Nothing listens: MLflow's own retries with backoff held such a search 4 minutes."""
    start = time.monotonic()
    code, out = grow(capfd, "search", "schedule.stages.0.lr.peak=1e-3,2e-3", *PROXY, f"data.cache_dir={data_cache}",
                     f"tracking.uri=http://{USER}:{PASSWORD}@127.0.0.1:{_free_port()}",
                     f"tracking.experiment={EXPERIMENT}", f"hydra.sweep.dir={tmp_path / 'search'}")
    elapsed = time.monotonic() - start
    assert code == 0, out[-3000:]
    assert elapsed < 60, elapsed
    assert "unreachable" in out and "not logged" in out and f"{USER}:***@127.0.0.1" in out
    assert_secrets_kept(out, tmp_path)


def test_mlflow_environment_variables_choose_the_store_experiment_and_credentials(
        tmp_path, data_cache, server, env, capfd):
    """tracking.uri=null is MLflow's default: $MLFLOW_TRACKING_URI, with the credentials in
    MLFLOW_TRACKING_USERNAME/PASSWORD (the way the masked output suggests), and
    $MLFLOW_EXPERIMENT_NAME; no ./mlflow.db."""
    env.chdir(tmp_path)
    env.setenv("MLFLOW_TRACKING_URI", server.gate.uri(credentials=False))
    env.setenv("MLFLOW_TRACKING_USERNAME", USER)
    env.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    env.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-environment")
    passed = server.gate.passed
    code, out = grow(capfd, "run", *PROXY, f"data.cache_dir={data_cache}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0 and "unreachable" not in out, out[-3000:]
    assert server.gate.refused == 0 and server.gate.passed > passed
    assert sorted(r.info.run_name for r in runs_in(server, "from-the-environment")) == ["proxy", "proxy:run"]
    assert not (tmp_path / "mlflow.db").exists()
    assert_secrets_kept(out, tmp_path, server.root)
