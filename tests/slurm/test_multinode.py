"""One stage across two Slurm nodes, and a node that dies mid-stage, on a real two-node
Slurm cluster on this machine (tests/slurm/cluster.py: two stock slurmd, n1 and n2).

Every stage of the tiny schedule runs data parallel over both nodes (engine=deepspeed,
layout.dp=2, one rank per node, gloo): one torchrun agent per node through srun, the
rendezvous at the head node's NodeAddr, hosted by node 0. Each torch start costs 15-30 s
on 2 cores, so there are two chains: an uninterrupted one and one whose second node is
crashed (its slurmd, slurmstepds and tasks killed) in the middle of stage s2.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.checkpoint.canonical import latest_checkpoint, read_meta
from orchestrator.run.state import is_finished
from orchestrator.slurm.paths import stage_state_file

from ..conftest import grow_in_process, read_summary
from .cluster import SlurmCluster, install_if_needed
from .test_cluster import grow, logs, status, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
pytest.importorskip("deepspeed")

TWO_NODES = ["engine=deepspeed", "engine.timeout_s=60", "checkpoint.every_steps=8",
             *(f"schedule.stages.{i}.layout.dp=2" for i in range(3))]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    reason = install_if_needed()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=2).start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    subprocess.run(["scancel", "--user", "root"], env=cluster.env, capture_output=True)
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def queue_empty(cluster: SlurmCluster) -> bool:
    return not subprocess.run(["squeue", "-h"], env=cluster.env, capture_output=True, text=True).stdout.strip()


def submit(cwd: Path, run_dir: Path, cache: Path, *overrides: str) -> list[str]:
    grow(cwd, "submit", "schedule=tiny", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}",
         "engine.threads=1", "tracking=off", *TWO_NODES, *overrides)
    record = json.loads((run_dir / "slurm" / "jobs.json").read_text())
    return [s["job_id"] for s in record["submissions"][-1]["stages"]]


def complete(run_dir: Path, cluster: SlurmCluster) -> bool:
    return ((run_dir / "summary.json").exists() and read_summary(run_dir)["status"] == "complete"
            and queue_empty(cluster))


def in_queue(cluster: SlurmCluster, job: str) -> bool:
    return job in subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True,
                                 text=True).stdout.split()


def stage_finished(run_dir: Path, index: int) -> bool:
    ckpt = latest_checkpoint(run_dir)
    return ckpt is not None and is_finished(read_meta(ckpt), index)


def s2_checkpointed_mid_stage(run_dir: Path) -> bool:
    ckpt = latest_checkpoint(run_dir)
    meta = read_meta(ckpt) if ckpt else {}
    return meta.get("stage_index") == 1 and meta.get("step", 0) > 0 and not meta.get("stage_complete")


@pytest.fixture(scope="module")
def two_node_chain(two_nodes, tmp_path_factory, data_cache):
    cwd = tmp_path_factory.mktemp("two-nodes")
    run_dir = cwd / "run"
    ids = submit(cwd, run_dir, data_cache)
    wait_for(lambda: complete(run_dir, two_nodes), 1200, "the two-node chain", on_timeout=lambda: logs(run_dir))
    return run_dir, ids


def test_a_stage_across_two_nodes_equals_the_one_process_run(two_node_chain, tiny_run):
    run_dir, ids = two_node_chain
    got, want = read_summary(run_dir), read_summary(tiny_run[1])
    for g, w in zip(got["stages"], want["stages"], strict=True):
        assert abs(g["val_loss"] - w["val_loss"]) <= 1e-5 * w["val_loss"], (g, w)
        assert g["tokens"] == w["tokens"]
    assert [s["layout"]["dp"] for s in got["stages"]] == [2, 2, 2]
    text = "".join(p.read_text() for p in sorted((run_dir / "slurm" / "logs").glob("*.out")))
    # every job ran on both nodes, met at the head node's address, on a port of its own
    assert text.count("2 node(s) n[1-2], rendezvous 127.0.0.1:") == 3
    ports = {line.rsplit(":", 1)[1] for line in text.splitlines() if "rendezvous 127.0.0.1:" in line}
    assert ports == {str(29500 + int(job) % 1000) for job in ids}


def test_a_node_that_dies_mid_stage_costs_a_requeue_not_the_run(two_nodes, two_node_chain, tmp_path, data_cache,
                                                                 capsys):
    run_dir = tmp_path / "run"
    ids = submit(tmp_path, run_dir, data_cache)

    wait_for(lambda: s2_checkpointed_mid_stage(run_dir), 900, "a checkpoint inside stage s2", interval=0.5,
             on_timeout=lambda: logs(run_dir))
    killed_at = time.monotonic()
    assert two_nodes.kill_node("n2")
    # restart its slurmd only once Slurm has noticed (node not responding, its job requeued), or
    # the job would hang waiting for it
    def noticed():
        job = subprocess.run(["scontrol", "show", "job", ids[1]], env=two_nodes.env, capture_output=True,
                             text=True).stdout
        return two_nodes.node_state("n2").endswith("*") and "Restarts=0" not in job
    wait_for(noticed, 240, "Slurm to notice n2's death and requeue the job", interval=0.5,
             on_timeout=lambda: f"n2: {two_nodes.node_state('n2')}\n{logs(run_dir)}")
    detected = time.monotonic() - killed_at
    two_nodes.start_node("n2")  # the machine comes back; Slurm returns it to service (ReturnToService=2)

    def resumed():
        attempts = json.loads(stage_state_file(run_dir, "s2").read_text())["attempts"]
        return len(attempts) >= 2
    wait_for(resumed, 300, "stage s2 to start again", interval=0.5, on_timeout=lambda: logs(run_dir))
    restarted = time.monotonic() - killed_at
    wait_for(lambda: complete(run_dir, two_nodes), 1200, "the chain after the node's death",
             on_timeout=lambda: logs(run_dir))
    got, want = read_summary(run_dir), read_summary(two_node_chain[0])
    assert got["totals"]["tokens"] == want["totals"]["tokens"]
    assert [s["tokens"] for s in got["stages"]] == [s["tokens"] for s in want["stages"]]
    assert abs(got["stages"][-1]["val_loss"] - want["stages"][-1]["val_loss"]) <= 1e-6
    attempts = json.loads(stage_state_file(run_dir, "s2").read_text())["attempts"]
    assert attempts[0]["job_id"] == attempts[-1]["job_id"] == ids[1]  # Slurm's own requeue of the job
    assert "interrupted" in attempts[0]["outcome"] and attempts[0]["nodes"] == 2
    st = status(tmp_path, run_dir)["stages"][1]
    assert st["requeue_reasons"] == ["node failure or preemption"] and st["nodes"] == 2
    with capsys.disabled():
        print(f"\nnode death: down after {detected:.1f} s, stage s2 running again after {restarted:.1f} s")


def test_a_stage_needing_more_nodes_than_the_partition_has_is_refused_before_submitting(two_nodes, tmp_path,
                                                                                        capsys):
    code = grow_in_process("submit", "schedule=tiny", f"hydra.run.dir={tmp_path / 'run'}", "tracking=off",
                           "engine=deepspeed", "schedule.stages.0.layout.dp=4")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "schedule.stages.0.layout: stage s1 needs 4 nodes" in err and "partition debug has 2" in err
    assert not (tmp_path / "run" / "slurm" / "jobs.json").exists()


def test_an_elastic_stage_goes_on_with_the_node_left(two_nodes, two_node_chain, tmp_path, data_cache, capsys):
    """submit.min_nodes=1: when n2 dies in stage s2, the job is not requeued: torchrun re-forms
    the group on n1, whose rank resumes from the last checkpoint at data parallel 1 with two
    micro-batches a step: the same tokens in the same order, the same loss within 1e-5."""
    run_dir = tmp_path / "run"
    ids = submit(tmp_path, run_dir, data_cache, "submit.min_nodes=1")
    wait_for(lambda: s2_checkpointed_mid_stage(run_dir), 900, "a checkpoint inside stage s2", interval=0.5,
             on_timeout=lambda: logs(run_dir))
    killed_at = time.monotonic()
    assert two_nodes.kill_node("n2")
    # the job goes on on n1 alone; Slurm drops the dead node from it once it marks it down, and
    # only then may n2's slurmd come back (earlier, the job's step would wait for n2's task)
    wait_for(lambda: stage_finished(run_dir, 1) and not in_queue(two_nodes, ids[1]), 900,
             "stage s2 to finish on the node left", interval=1, on_timeout=lambda: logs(run_dir))
    two_nodes.start_node("n2")  # back for stage s3, which starts on two nodes again
    wait_for(lambda: complete(run_dir, two_nodes), 1200, "the elastic chain", on_timeout=lambda: logs(run_dir))
    elapsed = time.monotonic() - killed_at
    got, want = read_summary(run_dir), read_summary(two_node_chain[0])
    assert [s["tokens"] for s in got["stages"]] == [s["tokens"] for s in want["stages"]]
    for g, w in zip(got["stages"], want["stages"], strict=True):
        assert abs(g["val_loss"] - w["val_loss"]) <= 1e-5 * w["val_loss"], (g, w)
    text = "".join(p.read_text() for p in sorted((run_dir / "slurm" / "logs").glob("*.out")))
    assert "stage s2 runs on 1 of its 2 ranks: data parallel 2 -> 1, 2 micro-batches of 4" in text
    attempts = json.loads(stage_state_file(run_dir, "s2").read_text())["attempts"]
    assert [a["job_id"] for a in attempts] == [ids[1]] and attempts[0]["outcome"] == "finished"
    with capsys.disabled():
        print(f"\nelastic: n2 killed mid-stage s2, chain complete {elapsed:.1f} s later")
