"""`grow submit [overrides]`: validate, render one sbatch script per unfinished stage,
and submit them chained with --dependency=afterok (or, with submit.dry_run=true, print them).

Each job runs `grow run hydra.run.dir=<run dir> run.only_stage=<stage> <overrides>`: it
grows into its stage from the previous stage's final checkpoint (idempotently: the grown
state is saved as the stage's step 0), trains it, and stops. Job ids go to
<run dir>/slurm/jobs.json for `grow status`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.atomic import read_json, write_json_atomic
from orchestrator.run.state import is_finished, latest_meta
from orchestrator.slurm.paths import jobs_file, slurm_dir
from orchestrator.slurm.queue import query_jobs

EXIT_CONFIG = 2


def _split(args: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(run dir, overrides for the config, overrides passed to each stage's `grow run`)."""
    run_dir, compose, job = None, [], []
    for a in args:
        key = a.lstrip("+~").split("=", 1)[0]
        if key in ("hydra.run.dir", "run_dir"):
            run_dir = a.split("=", 1)[1]
            continue
        if key.startswith("hydra"):
            continue  # Hydra's own settings do not change what a stage computes
        compose.append(a)
        if not (key == "submit" or key.startswith("submit.") or key.startswith("run.")):
            job.append(a)
    return run_dir, compose, job


def _compose(overrides: list[str], run_dir: Path):
    from hydra import compose, initialize_config_dir

    from orchestrator.cli import CONF_DIR, _precheck
    from orchestrator.config.schema import register_schema
    from orchestrator.config.validate import load_config

    code = _precheck(overrides)
    if code is not None:
        return code
    register_schema()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        raw = compose("config", overrides=overrides + [f"run_dir={run_dir}"])
    return load_config(raw)


def _sbatch(script: Path, dependency: str | None) -> str:
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    proc = subprocess.run(cmd + [str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script.name} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_command(args: list[str]) -> int:
    from orchestrator.config.validate import ConfigError
    from orchestrator.slurm.render import render_stage

    run_dir_arg, compose_overrides, job_overrides = _split(args)
    workdir = Path.cwd()
    try:
        # the run dir is needed to render; default like `grow run`'s: runs/<schedule>/<time>
        cfg = _compose(compose_overrides, Path(run_dir_arg or "/unused").resolve())
        if isinstance(cfg, int):
            return cfg
        if run_dir_arg is None:
            run_dir = workdir / "runs" / cfg.schedule.name / time.strftime("%Y-%m-%d_%H-%M-%S")
            cfg.run_dir = str(run_dir)
        else:
            run_dir = Path(run_dir_arg).expanduser().resolve()
        stages = cfg.schedule.stages
        meta = latest_meta(run_dir)
        todo = [(i, st) for i, st in enumerate(stages) if not is_finished(meta, i)]
        if not todo:
            print(f"grow: every stage of {run_dir} is finished; nothing to submit")
            return 0
        (slurm_dir(run_dir) / "logs").mkdir(parents=True, exist_ok=True)
        scripts = []
        for i, st in todo:
            text = render_stage(cfg, i, st, run_dir, workdir, job_overrides)
            path = slurm_dir(run_dir) / f"{i}-{st.name}.sbatch"
            path.write_text(text)
            path.chmod(0o755)
            scripts.append((i, st.name, path, text))
    except ConfigError as e:
        print(f"grow: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    if cfg.submit.dry_run:
        prev = None
        for i, name, path, text in scripts:
            dep = f" --dependency=afterok:<job of {prev}>" if prev else ""
            print(f"# ---- {path}\n# would run: sbatch --parsable{dep} {path}\n{text}")
            prev = name
        print(f"grow: dry run: {len(scripts)} script(s) written under {slurm_dir(run_dir)}; nothing submitted")
        return 0

    if not shutil.which("sbatch"):
        print("grow: sbatch not found; is this a Slurm login node? (submit.dry_run=true writes the scripts)",
              file=sys.stderr)
        return 1
    record = read_json(jobs_file(run_dir), {"run_dir": str(run_dir), "submissions": []})
    if record["submissions"]:
        last = [s["job_id"] for s in record["submissions"][-1]["stages"]]
        queued = {j: q for j, q in query_jobs(last).items() if q["state"] in ("PENDING", "RUNNING",
                                                                              "REQUEUED", "CONFIGURING")}
        if queued:
            print(f"grow: jobs {', '.join(queued)} of {run_dir} are still queued or running; "
                  f"see `grow status run_dir={run_dir}` or scancel them first", file=sys.stderr)
            return 1
    submitted, prev = [], None
    try:
        for i, name, path, _ in scripts:
            prev = _sbatch(path, prev)
            submitted.append({"index": i, "name": name, "job_id": prev, "script": str(path)})
            print(f"grow: stage {i} {name}: job {prev}" + (f" (after {submitted[-2]['job_id']})"
                                                          if len(submitted) > 1 else ""))
    finally:
        if submitted:
            record["submissions"].append({"time": time.time(), "stages": submitted})
            write_json_atomic(jobs_file(run_dir), record)
    print(f"grow: run dir {run_dir}; follow with `grow status run_dir={run_dir}`")
    return 0
