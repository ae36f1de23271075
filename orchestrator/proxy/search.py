"""Proxy hyperparameter search (FLM-101B, muP): a space of override key -> values, swept on
a small proxy schedule, the member with the lowest final validation loss chosen, and the
overrides that carry its values to a target schedule.

A space is a YAML mapping of Hydra override keys to lists of values; shipped presets live
in conf/search_space/ (`search.space=flm`), a user's in DIR/search_space/ (--config-dir
DIR) or any file (`search.space=path.yaml`).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from orchestrator.config.parse import composition_error
from orchestrator.exits import UsageError
from orchestrator.package_data import CONF_DIR

SPACE_DIR = "search_space"
FIRST_STAGE = "schedule.stages.0."


def load_space(name: str, config_dir: Path | None) -> dict[str, list]:
    """A preset by name (the user's directory first) or a YAML file by path."""
    dirs = ([config_dir / SPACE_DIR] if config_dir else []) + [CONF_DIR / SPACE_DIR]
    candidates = [d / f"{name}.yaml" for d in dirs] + [Path(name).expanduser()]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        shipped = sorted(p.stem for p in (CONF_DIR / SPACE_DIR).glob("*.yaml"))
        raise UsageError(f"search.space: {name!r} is neither a preset ({', '.join(shipped)}) nor a file")
    try:
        space = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"search.space: {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(space, dict) or not all(isinstance(k, str) and isinstance(v, list) and v
                                              for k, v in space.items()):
        raise UsageError(f"search.space: {path}: must map override keys to non-empty lists of values")
    return {k: [str(x) for x in v] for k, v in space.items()}


def swept_on_command_line(overrides: list[str]) -> dict[str, list[str]]:
    """`key=a,b,c` overrides given with the search: part of the space too."""
    space = {}
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:  # a malformed override: one line naming it
        raise composition_error(e) from None
    for o in parsed:
        if o.is_sweep_override():
            space[o.get_key_element().lstrip("+~")] = list(o.sweep_string_iterator())
    return space


def space_overrides(space: dict[str, list[str]]) -> list[str]:
    return [f"{k}={','.join(v)}" for k, v in space.items()]


def choose(finished: list[dict]) -> dict:
    """The member with the lowest final validation loss (the earlier member on a tie)."""
    return min(finished, key=lambda m: (m["final_val_loss"], m["member"]))


def apply_to(values: dict[str, str], target_raw) -> list[str]:
    """Overrides that give a target schedule the chosen values. A first-stage key of the
    proxy (`schedule.stages.0.lr.peak`) goes to the target's first stage and to every later
    stage that sets it itself (one left null inherits from the stage before); any other key
    (model.init_std, model.mup.output_mult) is the same for every stage. `target_raw`: the
    target's composed config; None: the values as swept."""
    out = []
    for key, value in values.items():
        if target_raw is None or not key.startswith(FIRST_STAGE):
            out.append(f"{key}={value}")
            continue
        rest = key[len(FIRST_STAGE):]
        for i in range(len(target_raw.schedule.stages)):
            if i == 0 or OmegaConf.select(target_raw, f"schedule.stages.{i}.{rest}") is not None:
                out.append(f"schedule.stages.{i}.{rest}={value}")
    return out


def log_to_mlflow(uri: str, experiment: str, report: dict, search_json: Path) -> str:
    """One parent run for the search; each member's own run (a schedule's parent run, with
    its stages under it) becomes its child. Returns the search run's id."""
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator.secrets import redact_config, redact_text
    from orchestrator.tracking.mlflow_tracker import experiment_id, open_client
    client = open_client(uri)
    exp_id = experiment_id(client, experiment)
    sweep = Path(report["sweep_dir"])
    report = redact_config(report)  # names, tags and params as every file holds them: secrets masked
    run = client.create_run(exp_id, run_name=redact_text(f"search:{sweep.parent.name}/{sweep.name}"),
                            tags={"grow.kind": "search", "sweep_dir": report["sweep_dir"]})
    run_id = run.info.run_id
    winner = report["winner"]
    params = [Param(f"space/{k}", ",".join(v)[:6000]) for k, v in report["space"].items()]
    params += [Param(f"winner/{k}", v) for k, v in winner["swept"].items()]
    params += [Param("target", str(report.get("target"))), Param("apply", " ".join(report["apply"])[:6000])]
    metrics = [Metric("search/best_val_loss", winner["final_val_loss"], 0, 0),
               Metric("search/finished", len(report["finished"]), 0, 0),
               Metric("search/members", len(report["members"]), 0, 0)]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100], metrics=metrics if i == 0 else [],
                         tags=[RunTag("winner_member", str(winner["member"])),
                               RunTag("partial", str(report["partial"]).lower())] if i == 0 else [])
    for m in report["members"]:
        if m.get("mlflow_parent_run_id"):
            client.set_tag(m["mlflow_parent_run_id"], "mlflow.parentRunId", run_id)
    if search_json.exists():
        client.log_artifact(run_id, str(search_json))
    client.set_terminated(run_id, "FINISHED")
    return run_id
