"""`grow submit [overrides]`: validate, render one sbatch script per unfinished stage,
and submit them chained with --dependency=afterok (or, with submit.dry_run=true, print them).

Each job runs `grow run hydra.run.dir=<run dir> run.only_stage=<stage> <overrides>`: it
grows into its stage from the previous stage's final checkpoint (idempotently: the grown
state is saved as the stage's step 0), trains it, and stops. A `--config-dir` travels to
the jobs as an absolute `hydra.searchpath`. Job ids go to <run dir>/slurm/jobs.json for
`grow status`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator.commands.compose import CommandLine, load, parse_args, search_path
from orchestrator.config.errors import ConfigError
from orchestrator.exits import EXIT_FAILED, exit_status, fail
from orchestrator.run.state import is_finished, latest_meta
from orchestrator.slurm.paths import slurm_dir
from orchestrator.slurm.queue import partition_nodes
from orchestrator.slurm.render import render_stage, split_tensor_parallel, stage_ranks
from orchestrator.slurm.submit import SubmitError, check_can_submit, submit_chain


def _split(cmd: CommandLine) -> tuple[str | None, CommandLine, list[str]]:
    """(run dir, the command line to compose, the overrides each stage's `grow run` gets)."""
    run_dir, compose, job = None, [], []
    for a in cmd.overrides:
        key = a.lstrip("+~").split("=", 1)[0]
        if key in ("hydra.run.dir", "run_dir"):
            run_dir = a.split("=", 1)[1]
            continue
        compose.append(a)
        if not (key.startswith("hydra") or key == "submit" or key.startswith("submit.")
                or key.startswith("run.")):
            job.append(a)  # Hydra's own settings, the submission and the run control stay here
    compose_cmd = CommandLine(compose, cmd.config_dir)
    sp = search_path(compose_cmd)  # the jobs find the same configs from their own directory
    return run_dir, compose_cmd, job + ([sp] if sp else [])


def check_partition_fits(cfg, todo: list) -> None:
    """A stage that needs more nodes than its partition has would wait in the queue forever."""
    found = partition_nodes(cfg.submit.partition)
    if found is None:
        return
    partition, available = found
    for i, st in todo:
        nodes, per_node = stage_ranks(cfg, i, st)
        if nodes > available:
            raise ConfigError(f"schedule.stages.{i}.layout",
                              f"stage {st.name} needs {nodes} nodes ({nodes * per_node} ranks, at most "
                              f"submit.tasks_per_node={cfg.submit.tasks_per_node} per node), but partition "
                              f"{partition} has {available}")


def submit_command(args: list[str]) -> int:
    workdir = Path.cwd()
    try:
        run_dir_arg, compose_cmd, job_overrides = _split(parse_args(args))
        # the run dir is needed to render; default like `grow run`'s: runs/<schedule>/<time>
        run_dir = Path(run_dir_arg or "/unused").expanduser().resolve()
        cfg = load(compose_cmd, run_dir=str(run_dir))
        if run_dir_arg is None:
            run_dir = workdir / "runs" / cfg.schedule.name / time.strftime("%Y-%m-%d_%H-%M-%S")
            cfg.run_dir = str(run_dir)
        stages = cfg.schedule.stages
        meta = latest_meta(run_dir)
        todo = [(i, st) for i, st in enumerate(stages) if not is_finished(meta, i)]
        if not todo:
            print(f"grow: every stage of {run_dir} is finished; nothing to submit")
            return 0
        texts = [(i, st.name, render_stage(cfg, i, st, run_dir, workdir, job_overrides)) for i, st in todo]
        warnings = [w for i, st in todo if (w := split_tensor_parallel(cfg, i, st))]
        if not cfg.submit.dry_run:
            check_partition_fits(cfg, todo)
    except ConfigError as e:
        return exit_status(e)
    for w in warnings:
        print(f"grow: warning: {w}", file=sys.stderr)

    (slurm_dir(run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    scripts = []
    for i, name, text in texts:
        path = slurm_dir(run_dir) / f"{i}-{name}.sbatch"
        path.write_text(text)
        path.chmod(0o755)
        scripts.append((i, name, path))
    if cfg.submit.dry_run:
        prev = None
        for (i, name, path), (_, _, text) in zip(scripts, texts):
            dep = f" --dependency=afterok:<job of {prev}>" if prev else ""
            print(f"# ---- {path}\n# would run: sbatch --parsable{dep} {path}\n{text}")
            prev = name
        print(f"grow: dry run: {len(scripts)} script(s) written under {slurm_dir(run_dir)}; nothing submitted")
        return 0
    try:
        check_can_submit(run_dir)
        submit_chain(run_dir, scripts)
    except SubmitError as e:
        return fail(EXIT_FAILED, str(e))
    print(f"grow: run dir {run_dir}; follow with `grow status run_dir={run_dir}`")
    return 0
