"""`grow submit`, requeue, cancel, `grow status` and submitit sweeps against a real
one-node Slurm cluster on loopback (tests/slurm/cluster.py starts it; CI installs it)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from orchestrator.checkpoint.canonical import latest_checkpoint, read_meta
from orchestrator.slurm.paths import stage_state_file

from ..conftest import grow_cmd, grow_in_process, read_summary
from .cluster import SlurmCluster, install_if_needed

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = install_if_needed()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    subprocess.run(["scancel", "--user", "root"], capture_output=True)  # jobs of this cluster only
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def grow(cwd: Path, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(grow_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"grow {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def status(cwd: Path, run_dir: Path) -> dict:
    """`grow status format=json` in this process (polled often: an interpreter per poll would
    cost more than the poll); the table through the real `grow` script is checked below."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert grow_in_process("status", f"run_dir={run_dir}", "format=json") == 0
    return json.loads(out.getvalue())


def wait_for(predicate, timeout: float, what: str, interval: float = 2.0, on_timeout=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{extra}")


def logs(run_dir: Path) -> str:
    return "\n".join(f"== {p}\n{p.read_text()[-4000:]}" for p in sorted((run_dir / "slurm" / "logs").glob("*")))


def gone(ids: list[str]) -> bool:
    """None of these jobs is in the queue any more (pending, running or completing)."""
    out = subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout
    return not out.strip()


def submit(cwd: Path, run_dir: Path, cache: Path, *overrides: str, env: dict | None = None) -> list[str]:
    proc = grow(cwd, "submit", "schedule=tiny", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}",
                "engine.threads=1", f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}", *overrides, env=env)
    record = json.loads((run_dir / "slurm" / "jobs.json").read_text())
    ids = [s["job_id"] for s in record["submissions"][-1]["stages"]]
    assert len(set(ids)) == 3, proc.stdout
    return ids


def test_submit_runs_three_chained_jobs_like_grow_run(slurm, tmp_path, data_cache, tiny_run):
    run_dir = tmp_path / "run"
    ids = submit(tmp_path, run_dir, data_cache)
    for i, job in enumerate(ids[1:], 1):  # chained: each waits for the previous one to succeed
        text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        assert f"afterok:{ids[i - 1]}" in text or "Dependency=(null)" in text  # (null) once satisfied
    wait_for(lambda: (run_dir / "summary.json").exists() and read_summary(run_dir)["status"] == "complete"
             and gone(ids), 600, "the three jobs", on_timeout=lambda: logs(run_dir))
    # the same config in one `grow run` (conftest's tiny_run)
    chained, single = read_summary(run_dir), read_summary(tiny_run[1])
    assert [s["name"] for s in chained["stages"]] == [s["name"] for s in single["stages"]] == ["s1", "s2", "s3"]
    assert chained["stages"][-1]["val_loss"] == pytest.approx(single["stages"][-1]["val_loss"], abs=1e-6)
    assert chained["totals"]["tokens"] == single["totals"]["tokens"]
    # one job per stage, each started after the previous one finished
    attempts = [json.loads(stage_state_file(run_dir, n).read_text())["attempts"] for n in ("s1", "s2", "s3")]
    assert [a[0]["job_id"] for a in attempts] == ids
    assert attempts[0][-1]["end"] <= attempts[1][0]["start"] and attempts[1][-1]["end"] <= attempts[2][0]["start"]
    st = status(tmp_path, run_dir)
    assert [r["state"] for r in st["stages"]] == ["FINISHED"] * 3
    assert [r["tokens"] for r in st["stages"]] == [16384] * 3 and st["running"] == []
    # one MLflow parent run for the chain, continued by each job
    from mlflow.tracking import MlflowClient
    client = MlflowClient(chained["mlflow"]["tracking_uri"])
    parent = client.get_run(chained["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert len({s["mlflow_run_id"] for s in chained["stages"]}) == 3


def stage_attempts(run_dir: Path, name: str) -> list[dict]:
    path = stage_state_file(run_dir, name)
    return json.loads(path.read_text())["attempts"] if path.exists() else []


def s1_log(run_dir: Path) -> str:
    return "".join(p.read_text() for p in (run_dir / "slurm" / "logs").glob("*0-s1-*"))


def start_requeued_now(job: str) -> None:
    """Wait until the job is pending again after its requeue. Slurm then holds it for
    cred_expire + 1 s (11 s here) before it starts again; that hold is kept: a slurmd refuses to
    launch a job it killed less than cred_expire ago ("Job credential revoked"), so starting it
    sooner (scontrol update StartTime=now) fails the job now and then."""
    def pending_again():
        text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        return "JobState=PENDING" in text and "Restarts=0" not in text
    wait_for(pending_again, 300, f"job {job} to be requeued", interval=0.5)


TIME_LIMIT_TEST = "test_time_limit_signal_reaches_the_stage_which_checkpoints_and_requeues"
TIME_LIMIT_STEPS = 240  # >= 180 s of sleeping alone


def _hold_once_requeued(run_dir: Path, job: str, stop: threading.Event) -> None:
    """Hold `job` once s1 has requeued itself, before Slurm would start it again (its restart
    is the USR1 test's subject, and would write checkpoints of its own)."""
    while not stop.wait(0.5):
        try:
            requeued = any(a.get("outcome") == "requeue" for a in stage_attempts(run_dir, "s1"))
        except ValueError:  # a state file being replaced: the next look
            continue
        text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        if requeued and "JobState=PENDING" in text and "Restarts=0" not in text:
            subprocess.run(["scontrol", "hold", job], capture_output=True)
            return


@pytest.fixture(scope="module", autouse=True)
def time_limit_chain(request, tmp_path_factory, data_cache):
    """The time-limit test's chain, submitted when this module starts (if that test is to run):
    Slurm signals s1 about a minute after it starts, a minute the tests before it use instead
    of waiting. (cwd, run dir, job ids); cancelled at the end."""
    if not any(item.name == TIME_LIMIT_TEST for item in request.session.items):
        yield None
        return
    request.getfixturevalue("slurm")
    cwd = tmp_path_factory.mktemp("time-limit")
    run_dir = cwd / "run"
    ids = submit(cwd, run_dir, data_cache, f"schedule.stages.0.tokens={TIME_LIMIT_STEPS * 512}", "submit.time=2",
                 "submit.signal_delay_s=60", "train.eval_every_steps=100", "checkpoint.every_steps=100",
                 env={"GROW_FAILPOINTS": "step.done=sleep:0.75"})  # sbatch --export=ALL carries it
    stop = threading.Event()
    holder = threading.Thread(target=_hold_once_requeued, args=(run_dir, ids[0], stop), daemon=True)
    holder.start()
    yield cwd, run_dir, ids
    stop.set()
    holder.join()
    subprocess.run(["scancel", *ids], capture_output=True)


def test_time_limit_signal_reaches_the_stage_which_checkpoints_and_requeues(time_limit_chain):
    """The generated script's `--signal=B:USR1@60` under a 2-minute limit: Slurm sends USR1
    (up to a minute early), the stage checkpoints and the job requeues itself before the
    limit. Each step sleeps 0.75 s (a failpoint, as a slow node would), so s1 outlasts its
    limit on a machine of any speed. What follows a requeue (resume, completion, every token
    counted once) is the next test's, which sends USR1 itself instead of waiting for it.
    (The chain is submitted when the module starts: see time_limit_chain.)"""
    cwd, run_dir, ids = time_limit_chain
    steps = TIME_LIMIT_STEPS
    try:
        assert "#SBATCH --signal=B:USR1@60" in (run_dir / "slurm" / "0-s1.sbatch").read_text()
        assert "#SBATCH --time=2" in (run_dir / "slurm" / "0-s1.sbatch").read_text()
        wait_for(lambda: any(a.get("outcome") == "requeue" for a in stage_attempts(run_dir, "s1")), 300,
                 "the first requeue", on_timeout=lambda: logs(run_dir))
        first = stage_attempts(run_dir, "s1")[0]
        assert first["outcome"] == "requeue" and first["job_id"] == ids[0] and first["restart"] == 0
        log = s1_log(run_dir)
        assert "USR1" in log and "stopped by SIGUSR1" in log and "requeueing job" in log
        meta = read_meta(latest_checkpoint(run_dir))  # the checkpoint the signal asked for
        assert meta["stage_name"] == "s1" and not meta["stage_complete"] and 0 < meta["step"] < steps
        row, = wait_for(lambda: [r for r in status(cwd, run_dir)["stages"] if r["requeues"] >= 1], 60,
                        "Slurm to count the requeue")
        assert row["stage"] == "s1" and row["tokens"] == meta["step"] * 512  # up to the checkpoint, once
    finally:
        subprocess.run(["scancel", *ids], check=True)
    wait_for(lambda: gone(ids), 60, "the cancelled jobs to leave the queue")


def test_usr1_checkpoints_requeues_and_completes(slurm, tmp_path, data_cache, monkeypatch):
    """USR1 to the batch script, as Slurm sends it before the time limit (here at once, with
    `scancel --signal=USR1 --batch` once s1 has made progress): the stage checkpoints, the
    job requeues itself and resumes, and the chain completes with every token counted once
    and the MLflow stage run continued. Steps sleep 0.15 s (a failpoint) so that the signal
    lands mid-stage on a machine of any speed."""
    run_dir = tmp_path / "run"
    steps = 64
    tokens = steps * 512  # steps of 8 x 64
    monkeypatch.setenv("GROW_FAILPOINTS", "step.done=sleep:0.15")  # sbatch --export=ALL carries it
    ids = submit(tmp_path, run_dir, data_cache, f"schedule.stages.0.tokens={tokens}",
                 "train.eval_every_steps=100", "checkpoint.every_steps=8")

    def s1_progressed():
        ckpt = latest_checkpoint(run_dir) if (run_dir / "checkpoints" / "latest").exists() else None
        return ckpt is not None and read_meta(ckpt)["stage_name"] == "s1" and read_meta(ckpt)["step"] >= 8
    wait_for(s1_progressed, 300, "s1's first checkpoint", interval=0.2, on_timeout=lambda: logs(run_dir))
    subprocess.run(["scancel", "--signal=USR1", "--batch", ids[0]], check=True)
    start_requeued_now(ids[0])
    wait_for(lambda: (run_dir / "summary.json").exists() and read_summary(run_dir)["status"] == "complete"
             and gone(ids), 900, "the requeued chain", interval=2, on_timeout=lambda: logs(run_dir))
    s1 = json.loads(stage_state_file(run_dir, "s1").read_text())
    outcomes = [a.get("outcome") for a in s1["attempts"]]
    assert "requeue" in outcomes and outcomes[-1] == "finished", outcomes
    assert {a["job_id"] for a in s1["attempts"]} == {ids[0]}  # the same job, requeued
    assert [a["restart"] for a in s1["attempts"]] == list(range(len(outcomes)))
    summary = read_summary(run_dir)
    # every token counted once across requeues: the same count as an uninterrupted run
    assert summary["stages"][0]["tokens"] == tokens
    assert summary["totals"]["tokens"] == tokens + 2 * 16384
    assert summary["stages"][0]["restarts"] == len(outcomes) - 1 and summary["stages"][0]["lost_s"] > 0
    assert summary["stages"][0]["steps"] == steps
    log = s1_log(run_dir)
    assert "USR1" in log and "stopped by SIGUSR1" in log and "requeueing job" in log
    st = status(tmp_path, run_dir)
    assert st["stages"][0]["requeues"] >= 1 and st["stages"][0]["state"] == "FINISHED"
    # the MLflow stage run continued across the requeues: one run, every step once
    from mlflow.tracking import MlflowClient
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    history = client.get_metric_history(summary["stages"][0]["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))


def test_cancelling_stage_one_leaves_later_stages_not_running(slurm, tmp_path, data_cache, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    ids = submit(tmp_path, run_dir, data_cache, "schedule.stages.0.tokens=5120000")
    wait_for(lambda: status(tmp_path, run_dir)["stages"][0]["slurm_state"] == "RUNNING", 120, "stage 1 to start")
    subprocess.run(["scancel", ids[0]], check=True)

    def settled():
        st = status(tmp_path, run_dir)
        return st if st["stages"][0]["slurm_state"] == "CANCELLED" and "will not run" in st["stages"][2]["state"] else None
    st = wait_for(settled, 60, "the cancel to show")
    assert st["running"] == []
    assert [r["job_ids"] for r in st["stages"]] == [[i] for i in ids]
    for row in st["stages"][1:]:
        assert row["slurm_state"] == "PENDING" and "will not run" in row["state"] and row["tokens"] == 0
    table = grow(tmp_path, "status", f"run_dir={run_dir}").stdout
    assert "CANCELLED" in table and "will not run" in table and "running now: nothing" in table
    time.sleep(5)
    assert status(tmp_path, run_dir)["stages"][1]["slurm_state"] == "PENDING"  # still not started
    # while they are queued a second submit of the same run is refused
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = grow_in_process("submit", "schedule=tiny", f"hydra.run.dir={run_dir}")
    assert code == 1 and "still queued" in capsys.readouterr().err
    subprocess.run(["scancel", *ids[1:]], check=True)


def test_sweep_through_submitit_slurm(slurm, tmp_path, data_cache):
    sweep_dir, db = tmp_path / "sweep", tmp_path / "sweep.db"
    grow(tmp_path, "run", "-m", "hydra/launcher=submitit_slurm", "schedule=tiny", "seed=0,1",
         f"data.cache_dir={data_cache}", "engine.threads=1", f"tracking.uri=sqlite:///{db}",
         "tracking.experiment=sweep", f"hydra.sweep.dir={sweep_dir}", timeout=600)
    report = json.loads((sweep_dir / "sweep_summary.json").read_text())
    members = report["members"]
    assert [m["swept"] for m in members] == [{"seed": "0"}, {"seed": "1"}]
    assert all(m["status"] == "complete" and m["final_val_loss"] > 0 and m["cost_usd"] > 0 for m in members)
    assert members[0]["final_val_loss"] != members[1]["final_val_loss"]
    assert list((sweep_dir / ".submitit").iterdir())  # the members really went through Slurm
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("sweep")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    assert sorted(r.data.params["sweep/seed"] for r in parents) == ["0", "1"]
    assert {r.info.run_id for r in parents} == {m["mlflow_parent_run_id"] for m in members}


def test_search_through_submitit_slurm(slurm, tmp_path, data_cache):
    """`grow search` on Slurm: the members are submitit jobs, the choice and MLflow as locally."""
    sweep_dir, db = tmp_path / "search", tmp_path / "search.db"
    proc = grow(tmp_path, "search", "hydra/launcher=submitit_slurm", "schedule=proxy",
                "schedule.stages.0.tokens=2048", "schedule.stages.0.lr.min=1e-5", "schedule.stages.0.lr.warmup_steps=1",
                "schedule.stages.0.lr.peak=1e-4,1e-2", "search.target=tiny", f"data.cache_dir={data_cache}",
                "engine.threads=1", f"tracking.uri=sqlite:///{db}", f"hydra.sweep.dir={sweep_dir}", timeout=600)
    report = json.loads((sweep_dir / "search.json").read_text())
    assert list((sweep_dir / ".submitit").iterdir())  # the members really went through Slurm
    losses = {m["swept"]["schedule.stages.0.lr.peak"]: m["final_val_loss"] for m in report["members"]}
    assert report["finished"] == [0, 1] and losses["0.01"] < losses["0.0001"]
    assert report["winner"]["swept"] == {"schedule.stages.0.lr.peak": "0.01"}
    assert report["apply"] == ["schedule.stages.0.lr.peak=0.01"]  # tiny's later stages inherit it
    assert "grow run schedule=tiny schedule.stages.0.lr.peak=0.01" in proc.stdout
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    for m in report["members"]:
        assert client.get_run(m["mlflow_parent_run_id"]).data.tags["mlflow.parentRunId"] == report["mlflow_run_id"]
