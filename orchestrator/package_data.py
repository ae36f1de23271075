"""Where the shipped Hydra configs, sbatch templates and measured growth curve are.

They live at the top of the repository (`conf/`, `slurm/`: users read and copy them there;
`bench/results/growth_curve.json`: the benchmark writes it) and ship inside the package
(pyproject.toml maps them to `orchestrator/conf`, `orchestrator/slurm_templates` and
`orchestrator/results`), so a wheel or `pip install .` has them too. An installed copy has
them beside this file; a source checkout (editable install, PYTHONPATH) one level up.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _shipped(installed: str, checkout: str) -> Path:
    inside = _PACKAGE / installed
    return inside if inside.is_dir() else _PACKAGE.parent / checkout


CONF_DIR = _shipped("conf", "conf")
SLURM_TEMPLATE_DIR = _shipped("slurm_templates", "slurm")
# bench/growth_curve.py's measured saving against tokens per parameter (grow plan prints it)
GROWTH_CURVE = _shipped("results", "bench/results") / "growth_curve.json"
