"""Slurm: `grow submit` (one chained sbatch job per stage), the job-side state helpers the
generated scripts call (finished flag, failure count, requeue decision), `grow status`,
and Hydra sweep reporting. Nothing here imports torch, so job-side helpers start fast."""
