"""The package carries its configs: a wheel built from the repository, installed into a
fresh environment, plans and runs from an unrelated directory with the user's own
schedule beside it, and never touches the repository's conf/."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from ..cli.test_entry import MINE  # a two-stage schedule of seconds: small, then wide

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {"orchestrator.conf": "conf", "orchestrator.slurm_templates": "slurm", "orchestrator.results": "bench/results"}


def test_pyproject_lists_every_package_and_maps_the_shipped_dirs():
    """Packages are listed (find cannot map conf/ and slurm/ into the package): a new one
    must be added, or the wheel would lack it."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    in_tree = {".".join(p.parent.relative_to(REPO).parts)
               for top in ("orchestrator", "growth_ops") for p in (REPO / top).rglob("__init__.py")}
    assert set(tool["packages"]) == in_tree | set(SHIPPED)
    assert tool["package-dir"] == SHIPPED


def _without_pythonpath() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _wheel_env(tmp_path: Path) -> Path:
    """A venv whose only project code is the wheel; the heavy dependencies come from this
    interpreter's site-packages through a .pth (whose own .pth files, the editable install's
    among them, are not processed)."""
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("orchestrator", "growth_ops", "conf", "slurm", "bench/results"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=600)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    # installed before the .pth exists, ignoring what is installed: pip must not take the
    # editable install (or a source tree on PYTHONPATH) for this package
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                    "--ignore-installed", "-q", *map(str, wheels.glob("*.whl"))],
                   check=True, capture_output=True, timeout=600, env=_without_pythonpath())
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_a_wheel_plans_and_runs_a_users_schedule_from_any_directory(tmp_path, data_cache):
    venv = _wheel_env(tmp_path)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    work = tmp_path / "elsewhere"
    (work / "myconf" / "schedule").mkdir(parents=True)
    (work / "myconf" / "schedule" / "mine.yaml").write_text(MINE)
    env = {**_without_pythonpath(), "OMP_NUM_THREADS": "1"}

    def run(*args):
        return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    where = run(str(venv / "bin" / "python"), "-c", "import orchestrator.package_data as p; "
                "print(p.__file__); print(p.CONF_DIR); print(p.SLURM_TEMPLATE_DIR); print(p.GROWTH_CURVE)").stdout.split()
    assert where == [str(site / "orchestrator" / "package_data.py"), str(site / "orchestrator" / "conf"),
                     str(site / "orchestrator" / "slurm_templates"),
                     str(site / "orchestrator" / "results" / "growth_curve.json")]
    assert Path(where[-1]).is_file() == (REPO / "bench" / "results" / "growth_curve.json").is_file()
    grow = str(venv / "bin" / "grow")
    plan = run(grow, "plan", "--config-dir", "myconf", "schedule=mine", "hydra.run.dir=plan")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads((work / "plan" / "plan.json").read_text())["stages"]
    assert [s["name"] for s in planned] == ["small", "wide"]
    proc = run(grow, "run", "--config-dir", "myconf", "schedule=mine", "tracking=off", "engine.threads=1",
               f"data.cache_dir={data_cache}", "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["small", "wide"] and summary["status"] == "complete"
    hydra_cfg = (work / "run" / ".hydra" / "hydra.yaml").read_text()
    assert f"path: {site / 'orchestrator' / 'conf'}" in hydra_cfg  # the installed configs, not the repo's
    assert f"path: {work / 'myconf'}" in hydra_cfg and str(REPO) not in hydra_cfg
    dry = run(grow, "submit", "--config-dir", "myconf", "schedule=mine", "hydra.run.dir=sub",
              "submit.dry_run=true")
    assert dry.returncode == 0, dry.stderr  # the sbatch template ships too
    script = (work / "sub" / "slurm" / "0-small.sbatch").read_text()
    assert f"hydra.searchpath=[file://{work / 'myconf'}]" in script
