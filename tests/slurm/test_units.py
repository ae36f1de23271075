"""Slurm pieces that need no cluster: rendering (placeholders, secrets, dry run), the
job-side requeue/failure decisions, and run.only_stage."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.slurm import jobstate
from orchestrator.run.state import is_finished, latest_meta
from orchestrator.slurm.paths import stage_state_file
from orchestrator.slurm.render import scrub_line, shell_word

from ..conftest import grow_cmd, grow_in_process

SECRET = "s3cr3t-Value-42"


def test_shell_word_turns_secret_values_into_env_references():
    secrets = {SECRET: "MY_API_TOKEN"}
    word = shell_word(f"tracking.uri=http://h/?t={SECRET}&x=$y", secrets)
    assert SECRET not in word and "${MY_API_TOKEN}" in word
    # bash reads it back as the original text with the variable expanded
    out = subprocess.run(["bash", "-c", f"y=no; printf %s {word}"], env={"MY_API_TOKEN": SECRET},
                         capture_output=True, text=True).stdout
    assert out == f"tracking.uri=http://h/?t={SECRET}&x=$y"
    assert scrub_line(f"export HF_TOKEN={SECRET}", secrets) == "export HF_TOKEN=${MY_API_TOKEN}"
    assert shell_word("a b", secrets) == "'a b'"


def _submit(tmp_path, *overrides, env=None):
    """`grow submit --dry-run` through the real `grow` script."""
    env = {**os.environ, **(env or {})}
    return subprocess.run(grow_cmd("submit", "schedule=tiny", f"hydra.run.dir={tmp_path / 'run'}",
                                   "submit.dry_run=true", *overrides),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def submit_here(tmp_path, monkeypatch, capsys):
    """`grow submit --dry-run` in this process (orchestrator.cli.main), from tmp_path:
    returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def submit(*overrides: str, env: dict | None = None):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        code = grow_in_process("submit", "schedule=tiny", f"hydra.run.dir={tmp_path / 'run'}",
                               "submit.dry_run=true", *overrides)
        out, err = capsys.readouterr()
        return code, out, err
    return submit


def test_dry_run_writes_and_prints_scripts_without_secrets(tmp_path, submit_here):
    code, stdout, stderr = submit_here(f"tracking.uri='http://127.0.0.1:5000/?token={SECRET}'",
                                       f"submit.setup=['export HF_TOKEN={SECRET}','module load cuda']",
                                       "submit.partition=gpu", "submit.account=proj", "submit.qos=high", "submit.mem=8G",
                                       "submit.tasks_per_node=4", "submit.gpus_per_node=4", "submit.launcher=torchrun",
                                       "submit.extra_sbatch=[--exclusive]", "submit.container=['--container-image=img.sqsh']",
                                       env={"MY_API_TOKEN": SECRET, "MLFLOW_TRACKING_PASSWORD": "hunter2-pass"})
    assert code == 0, stderr
    scripts = sorted((tmp_path / "run" / "slurm").glob("*.sbatch"))
    assert [p.name for p in scripts] == ["0-s1.sbatch", "1-s2.sbatch", "2-s3.sbatch"]
    assert "nothing submitted" in stdout and "afterok" in stdout
    assert not (tmp_path / "run" / "slurm" / "jobs.json").exists()
    for p in scripts:
        text = p.read_text()
        assert text in stdout
        assert SECRET not in text and "hunter2" not in text
        assert "${MY_API_TOKEN}" in text
        for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                     "#SBATCH --mem=8G", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
                     "module load cuda"):
            assert line in text
        # the local engine's stages are one rank each, forced through torchrun here
        assert "torch.distributed.run --nnodes=1 --nproc_per_node=1 --rdzv_backend=c10d" in text
        assert "--container-image=img.sqsh" in text
        assert f"run.only_stage={p.stem.split('-')[1]}" in text
        assert subprocess.run(["bash", "-n", str(p)]).returncode == 0  # valid bash
    assert "submit.partition" not in scripts[0].read_text()  # submit.* stays out of the job's grow run


def test_credentials_in_a_url_are_refused(tmp_path):
    proc = _submit(tmp_path, "tracking.uri=http://bob:pa55word@127.0.0.1:5000")  # the real `grow` script
    assert proc.returncode == 2
    assert "user:password@" in proc.stderr and "pa55word" not in proc.stderr
    assert not list((tmp_path / "run").glob("slurm/*.sbatch"))


def test_bad_submit_keys_are_config_errors(submit_here):
    for override, key in (("submit.time=soon", "submit.time"), ("submit.launcher=mpirun", "submit.launcher"),
                          ("run.only_stage=nope", "run.only_stage")):
        code, _, err = submit_here(override)
        assert code == 2 and key in err, (override, err)


def _checkpoint(run_dir: Path, stage: str, tokens: int, index: int = 0, complete: bool = False) -> None:
    """The part of a checkpoint the Slurm bookkeeping reads: `latest` and meta.json."""
    ck = run_dir / "checkpoints" / f"{index}-{stage}" / f"step_{tokens:08d}"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / "meta.json").write_text(json.dumps({"stage_index": index, "stage_complete": complete,
                                              "ledger": {stage: {"tokens": tokens}}}))
    (run_dir / "checkpoints" / "latest").write_text(json.dumps({"path": f"{index}-{stage}/{ck.name}"}))


def test_requeue_counts_progress_and_stops_a_crash_loop(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    # no scontrol: job 7 of a test cluster still running must not look like this job
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))
    assert jobstate.begin(run_dir, "s1", 0, 2) == 0
    _checkpoint(run_dir, "s1", 100)
    # signalled with progress: requeue, and the failure count stays 0
    assert jobstate.end(run_dir, "s1", 0, 138, True, 2) == jobstate.EXIT_REQUEUE
    assert jobstate.begin(run_dir, "s1", 0, 2) == 0
    # crash without progress: a failure, still requeued (1 < 2)
    assert jobstate.end(run_dir, "s1", 0, 1, False, 2) == jobstate.EXIT_REQUEUE
    assert jobstate.begin(run_dir, "s1", 0, 2) == 0
    # signalled but no progress either: second failure in a row -> give up
    assert jobstate.end(run_dir, "s1", 0, 138, True, 2) == 1
    assert jobstate.begin(run_dir, "s1", 0, 2) == jobstate.EXIT_TOO_MANY_FAILURES
    state = json.loads(stage_state_file(run_dir, "s1").read_text())
    assert [a["outcome"] for a in state["attempts"]][:2] == ["requeue", "failure"]
    # a config error is never retried
    assert jobstate.end(run_dir, "s2", 1, 2, False, 5) == 1


def test_a_finished_stage_makes_its_job_exit_without_training(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, "s1", 512, index=0, complete=True)
    assert jobstate.begin(run_dir, "s1", 0, 3) == jobstate.EXIT_FINISHED
    assert jobstate.end(run_dir, "s1", 0, 0, False, 3) == 0
    assert jobstate.begin(run_dir, "s2", 1, 3) == 0  # the next stage is not finished


def test_a_stage_in_flight_is_not_finished(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, "s2", 512, index=1, complete=False)
    meta = latest_meta(run_dir)
    assert is_finished(meta, 0) and not is_finished(meta, 1) and not is_finished(meta, 2)


@pytest.mark.slow
def test_only_stage_runs_one_stage_and_refuses_to_skip(tmp_path, data_cache):
    from ..conftest import fork_grow, read_summary
    run_dir = tmp_path / "run"
    common = (f"hydra.run.dir={run_dir}", "tracking=off")
    proc = fork_grow(tmp_path, *common, "run.only_stage=s2", cache=data_cache, check=False)
    assert proc.returncode == 2 and "needs 's1' finished first" in proc.stderr
    fork_grow(tmp_path, *common, "run.only_stage=s1", cache=data_cache)
    s = read_summary(run_dir)
    assert [st["name"] for st in s["stages"]] == ["s1"] and "only_stage" in s["status"]
    assert is_finished(latest_meta(run_dir), 0) and not is_finished(latest_meta(run_dir), 1)
    again = fork_grow(tmp_path, *common, "run.only_stage=s1", cache=data_cache)
    assert "already finished" in again.stdout
    fork_grow(tmp_path, *common, "run.only_stage=s2", cache=data_cache)
    assert [st["name"] for st in read_summary(run_dir)["stages"]] == ["s1", "s2"]


def test_each_stage_gets_the_ranks_its_layout_needs(tmp_path):
    from orchestrator.config.schema import LayoutConfig, RunConfig, StageConfig
    from orchestrator.slurm.render import render_stage, stage_ranks
    from orchestrator.config.errors import ConfigError
    cfg = RunConfig()
    cfg.submit.tasks_per_node = 4
    stages = [StageConfig(name="a"), StageConfig(name="b", layout=LayoutConfig(tp=2, dp=4)),
              StageConfig(name="c", layout=LayoutConfig(dp=2))]
    assert [stage_ranks(cfg, i, st) for i, st in enumerate(stages)] == [(1, 1), (2, 4), (1, 2)]
    text = render_stage(cfg, 1, stages[1], tmp_path / "run", tmp_path, ["engine=deepspeed"])
    assert "#SBATCH --nodes=2" in text and "--nnodes=2 --nproc_per_node=4" in text
    # the rendezvous at the head node's NodeAddr, on a port of the job's own, hosted by node 0
    assert 'rdzv_endpoint="$HEAD_ADDR:$RDZV_PORT"' in text and "RDZV_PORT=$(( 29500 + SLURM_JOB_ID % 1000 ))" in text
    assert "scontrol show node \"$HEAD_NODE\" -o" in text and 'is_host=$(( SLURM_NODEID == 0 ))' in text
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in text
    one = render_stage(cfg, 0, stages[0], tmp_path / "run", tmp_path, [])
    assert "torch.distributed.run" not in one and "kill -USR1" in one
    cfg.submit.nodes = 3
    with pytest.raises(ConfigError, match="do not split evenly"):
        stage_ranks(cfg, 1, stages[1])


def test_ledger_keeps_restarts_and_lost_time_apart_from_spend():
    from orchestrator.budget.ledger import Ledger
    ledger = Ledger()
    ledger.stage("s1").add(512, 1e9, 2.0, 1, 3.0)
    ledger.add_lost("s1", 40.0)
    ledger.add_lost("s1", 20.0)
    back = Ledger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert back.lost == {"s1": {"restarts": 2, "lost_s": 60.0}}
    assert back.total.tokens == 512 and back.total.wall_s == 2.0  # lost time is not spend
    assert set(back.stages) == {"s1"}
    assert Ledger.from_dict({"s1": back.to_dict()["s1"]}).lost == {}  # checkpoints from before


def test_tensor_parallelism_that_would_span_nodes_is_said():
    from orchestrator.config.schema import LayoutConfig, RunConfig, StageConfig
    from orchestrator.slurm.render import split_tensor_parallel
    cfg = RunConfig()
    cfg.submit.tasks_per_node = 4
    inside = StageConfig(name="in", layout=LayoutConfig(tp=4, dp=2))  # 2 nodes x 4: a TP group per node
    across = StageConfig(name="across", layout=LayoutConfig(tp=8, dp=1))  # 2 nodes x 4: one group on both
    assert split_tensor_parallel(cfg, 0, inside) is None
    assert "tp=8 does not divide the 4 ranks per node" in split_tensor_parallel(cfg, 1, across)
    cfg.submit.tasks_per_node = 8
    assert split_tensor_parallel(cfg, 1, across) is None  # one node


def test_an_elastic_stage_is_launched_to_survive_a_node_and_checked_for_every_node_count(tmp_path):
    from orchestrator.config.errors import ConfigError
    from orchestrator.config.schema import LayoutConfig, RunConfig, StageConfig
    from orchestrator.run.launch import fit_to_world
    from orchestrator.slurm.render import render_stage
    cfg = RunConfig()
    cfg.submit.min_nodes = 1
    stage = StageConfig(name="s", batch_size=8, layout=LayoutConfig(dp=2))
    cfg.schedule.stages = [stage]
    text = render_stage(cfg, 0, stage, tmp_path / "run", tmp_path, ["engine=deepspeed"])
    assert "#SBATCH --no-kill" in text and "--no-kill --kill-on-bad-exit=0" in text
    assert "--nnodes=1:2 --max-restarts=3" in text and "submit.min_nodes=1" in text
    cfg.submit.min_nodes = None
    plain = render_stage(cfg, 0, stage, tmp_path / "run", tmp_path, ["engine=deepspeed"])
    assert "--no-kill" not in plain and "--nnodes=2 " in plain and "--kill-on-bad-exit=1" in plain
    cfg.submit.min_nodes = 1
    stage.layout.dp, stage.batch_size = 3, 9  # on 2 of 3 nodes: 9 sequences over dp 2
    with pytest.raises(ConfigError, match="submit.min_nodes: stage s on 2 of its 3 nodes"):
        render_stage(cfg, 0, stage, tmp_path / "run", tmp_path, [])
    # the rank's side: the stage on 1 rank of 2 keeps its global batch with micro-batches
    stage.layout.dp, stage.batch_size = 2, 8
    cfg.run.only_stage = "s"
    fitted, note = fit_to_world(cfg, 1)
    assert fitted.schedule.stages[0].layout == LayoutConfig(dp=1, micro_batch_size=4)
    assert "data parallel 2 -> 1, 2 micro-batches of 4" in note
    assert fit_to_world(cfg, 2) == (cfg, None)
    cfg.submit.min_nodes = None
    assert fit_to_world(cfg, 1) == (cfg, None)  # not elastic: the planned layout stands


def test_the_rendezvous_port_skips_one_in_use_on_the_head_node(tmp_path):
    import socket
    from orchestrator.config.schema import LayoutConfig, RunConfig, StageConfig
    from orchestrator.slurm.render import render_stage
    stage = StageConfig(name="s", layout=LayoutConfig(dp=2))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port, job = busy.getsockname()[1], 7
        cfg = RunConfig()
        cfg.submit.rdzv_port = port - job  # job 7's derived port is the busy one
        text = render_stage(cfg, 0, stage, tmp_path / "run", tmp_path, ["engine=deepspeed"])
        block = text[text.index("RDZV_PORT=$(("):text.index("\ndone\n") + 6]  # the script's own lines
        out = subprocess.run(["bash", "-c", f"HEAD_ADDR=127.0.0.1 HEAD_NODE=n1 SLURM_JOB_ID={job}\n{block}\n"
                              "echo PORT=$RDZV_PORT"], capture_output=True, text=True).stdout
    assert f"rendezvous port {port} is in use on n1" in out and f"PORT={port + 1}" in out
