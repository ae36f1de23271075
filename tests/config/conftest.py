"""Shared by the config tests: the composed tiny schedule as a plain dict, and `grow run`'s
precheck asserted to refuse in one line."""
from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from orchestrator.commands.run_job import precheck
from orchestrator.config.schema import register_schema
from orchestrator.package_data import CONF_DIR


def _base() -> dict:
    register_schema()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        raw = compose("config", overrides=["schedule=tiny", "run_dir=/unused"])
    return {k: v for k, v in OmegaConf.to_container(raw, resolve=True).items() if k != "hydra"}


def refused(capsys, tmp_path, *overrides) -> str:
    """Run `grow run`'s precheck; assert exit 2, one line, and nothing under tmp_path/run."""
    run_dir = tmp_path / "run"
    code = precheck(["schedule=tiny", f"hydra.run.dir={run_dir}", *overrides])  # grow run's: runs here
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("grow: config error: "), err
    assert not run_dir.exists()
    return err
