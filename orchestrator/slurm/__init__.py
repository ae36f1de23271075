"""Slurm only: render one sbatch script per stage, submit them chained (`sbatch`), the
job-side state helpers the generated scripts call (finished flag, failure count, requeue
decision), and what `grow status` shows. The `grow submit` and `grow status` verbs are in
orchestrator/commands/."""
