"""Multi-rank runs of `grow run engine=deepspeed`.

Outside a launch (no RANK/SLURM_PROCID in the environment) `drive` starts one torchrun per
stage, each with that stage's tp*pp*dp ranks on a free port (`--standalone`) and
`run.only_stage` set, because every stage may need a different world size; growth into a
stage runs in that stage's job, on its new layout, from the canonical checkpoint. Inside
a launch (torchrun or srun already started the ranks) the runner runs in place. Either way
a rank's first act is `prepare_rank`: what the engine needs in the environment is set here,
by the launch, and nowhere else.

Fail fast: torchrun is told never to restart and polls its workers every 0.2 s; when one
rank dies it stops the others and reports the failed rank (its traceback is recorded by
`@record`), and the process-group timeout (`engine.timeout_s`) bounds any collective
still waiting on a dead peer. torchrun runs through `rank_exits`, so the driver's last line
says which rank ended how (signal, status, exception) and whether a rerun can help.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from orchestrator.checkpoint.canonical import latest_checkpoint, read_meta
from orchestrator.config.schema import RunConfig
from orchestrator.run.rank_exits import explain, read_report
from orchestrator.run.state import check_resumable, next_stage
from orchestrator.schedule import layout_world

ONLY_STAGE_DONE = "stopped: run.only_stage="


def in_launch() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def rank_environment(environ: Mapping[str, str], device: str) -> dict[str, str]:
    """What a rank adds to the environment its launcher gave it, before the engine imports
    DeepSpeed, which reads all of it from there:
    - under a plain srun (no torchrun), RANK/WORLD_SIZE/LOCAL_RANK from Slurm's task ids, as
      torch.distributed's env:// rendezvous and DeepSpeed expect them;
    - DS_ACCELERATOR from `engine.device` unless already set: DeepSpeed picks its accelerator
      once, when first imported, and would otherwise detect one itself (CUDA on a GPU machine
      even with engine.device=cpu; elsewhere the CPU, with a warning)."""
    add = {}
    if "RANK" not in environ and "SLURM_PROCID" in environ:
        add.update(RANK=environ["SLURM_PROCID"], WORLD_SIZE=environ["SLURM_NTASKS"],
                   LOCAL_RANK=environ.get("SLURM_LOCALID", "0"))
    if "DS_ACCELERATOR" not in environ:
        from orchestrator.engines.device import device_type

        add["DS_ACCELERATOR"] = device_type(device)
    return add


def prepare_rank(cfg: RunConfig) -> None:
    """Complete this process's environment as a rank of `cfg`'s multi-rank engine (see
    `rank_environment`), before anything imports DeepSpeed."""
    os.environ.update(rank_environment(os.environ, cfg.engine.device))


def fit_to_world(cfg: RunConfig, world: int) -> tuple[RunConfig, str | None]:
    """`cfg` for the ranks this launch really has. An elastic stage (submit.min_nodes) that
    torchrun re-formed on fewer nodes after one died trains data parallel over the ranks left:
    dp shrinks and each rank accumulates micro-batches of the planned per-rank size, so the
    global batch, the data order and the tokens stay the same. (The new layout, and a note
    saying so; the config as it was, and None, when nothing changed or it is not elastic.)"""
    name = cfg.run.only_stage
    if cfg.submit.min_nodes is None or name is None:
        return cfg, None
    stages = cfg.schedule.stages
    i = [s.name for s in stages].index(name)
    lay, batch = stages[i].layout, stages[i].batch_size
    if world == layout_world(lay) or world % (lay.tp * lay.pp):
        return cfg, None  # the planned layout, or one no data-parallel size fits: the checks say so
    dp = world // (lay.tp * lay.pp)
    micro = lay.micro_batch_size or batch // lay.dp
    stage = dataclasses.replace(stages[i], layout=dataclasses.replace(lay, dp=dp, micro_batch_size=micro))
    schedule = dataclasses.replace(cfg.schedule, stages=[*stages[:i], stage, *stages[i + 1:]])
    note = (f"stage {name} runs on {world} of its {layout_world(lay)} ranks: data parallel {lay.dp} -> {dp}, "
            f"{batch // dp // micro} micro-batches of {micro} per rank and step (the global batch is kept)")
    return dataclasses.replace(cfg, schedule=schedule), note


def leave_process_group() -> None:
    """A rank leaves its process group before the interpreter exits: otherwise gloo's threads
    can still be running at exit and abort it (`terminate called without an active exception`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def next_stage_index(cfg: RunConfig) -> int | None:
    """The stage the next launch runs (None: the schedule is finished)."""
    ckpt = latest_checkpoint(Path(cfg.run_dir), check_meta=check_resumable)  # as the ranks will choose
    return next_stage(read_meta(ckpt) if ckpt else None, len(cfg.schedule.stages)).index


def drive(cfg: RunConfig) -> int:
    """Run the schedule stage by stage, one torchrun per stage; returns an exit status."""
    import torch

    from orchestrator.data import prepare_data
    from orchestrator.engines.device import pick_device

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        device = pick_device(cfg.engine.device)
    except RuntimeError as e:
        print(f"grow: config error: {e}", file=sys.stderr, flush=True)
        return 2
    prepare_data(cfg.data)  # tokenize once here, not racing in every rank
    names = [s.name for s in cfg.schedule.stages]
    while True:
        index = next_stage_index(cfg)
        if index is None:
            print(f"{run_dir} already finished; nothing to do", flush=True)
            return 0
        if cfg.run.only_stage is not None and names.index(cfg.run.only_stage) < index:
            print(f"stage {cfg.run.only_stage} of {run_dir} already finished; nothing to do", flush=True)
            return 0
        only = cfg.run.only_stage or names[index]
        job = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, only_stage=only))
        # the ranks' config: unredacted (rank 0 needs the tracking URI's password), so the
        # owner's only, and removed when the stage's launch ends
        path = run_dir / f".launch-{index}.json"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(job), f)
        world = layout_world(cfg.schedule.stages[names.index(only)].layout)
        if device.type == "cuda" and world > torch.cuda.device_count():
            print(f"grow: config error: stage {only} needs {world} ranks, one GPU each; this machine has "
                  f"{torch.cuda.device_count()} (engine.device=cpu runs the ranks on the CPU)",
                  file=sys.stderr, flush=True)
            return 2
        print(f"launching stage {only} on {world} ranks ({device.type})", flush=True)
        report = run_dir / f".launch-{index}-exits.json"  # how each failed rank ended (rank_exits)
        report.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "orchestrator.run.rank_exits", str(report), "--standalone",
               "--nproc_per_node", str(world), "--max-restarts", "0", "--monitor-interval", "0.2",
               "-m", "orchestrator.run.launch", str(path)]
        # DeepSpeed picks its accelerator when first imported: the ranks find it set (see rank_environment)
        env = {"DS_ACCELERATOR": device.type, "PYTHONUNBUFFERED": "1", **os.environ}
        try:
            agent = subprocess.Popen(cmd, env=env)
            try:
                code = agent.wait()
            except BaseException:  # as subprocess.run: never leave the agent behind
                agent.kill()
                agent.wait()
                raise
            failures = read_report(report)
        finally:
            path.unlink(missing_ok=True)
            report.unlink(missing_ok=True)
        if code != 0:
            line, status = explain(only, code, agent.pid, failures)
            print(f"grow: {line}", file=sys.stderr, flush=True)
            return status
        summary = run_dir / "summary.json"
        status = json.loads(summary.read_text()).get("status", "") if summary.exists() else ""
        if cfg.run.only_stage is not None or not status.startswith(ONLY_STAGE_DONE):
            return 0


def die_with_agent() -> None:
    """A rank dies with its torchrun agent. torch starts each rank in a session of its own, so
    a SIGKILL of `grow run`'s process group (or of the agent alone) left the ranks running,
    orphaned, waiting on their peers until the collective timeout. Linux's parent-death
    signal ends them with the agent; checkpoints are atomic, so a rerun resumes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    agent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if agent == 1 or os.getppid() != agent:  # the agent died before the signal was armed
        os._exit(128 + signal.SIGKILL)


def _rank_main(config_path: str) -> int:
    """One rank: read the resolved config the driver wrote, join the group, run; a known
    failure is one line and its exit status (orchestrator/exits.py), as for `grow run`.
    Imported here: deepspeed_engine loads DeepSpeed and Megatron, which only ranks need."""
    from orchestrator.config.parse import parse
    from orchestrator.engines.deepspeed_engine import init_distributed
    from orchestrator.exits import exit_status
    from orchestrator.run.runner import run_schedule

    try:
        cfg = parse(json.loads(Path(config_path).read_text()))  # checked by the driver
        prepare_rank(cfg)
        init_distributed(cfg.engine.timeout_s, cfg.engine.device)
        run_schedule(cfg)
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        return status
    return 0


if __name__ == "__main__":
    die_with_agent()
    from torch.distributed.elastic.multiprocessing.errors import record

    from orchestrator.secrets import masked_output
    with masked_output():  # a rank prints like `grow` itself: secrets masked
        status = record(_rank_main)(sys.argv[1])
    sys.exit(status)
