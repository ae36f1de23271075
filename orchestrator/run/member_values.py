"""What a sweep member actually ran, read from its own run directory: the settings its run
pinned in config.json (and, for a config group such as `model=...`, the choice recorded in
its .hydra/hydra.yaml), never the arguments it was launched with. A member refused because
its directory held another run trained what that run pinned; a report that labelled it with
the launch arguments would recommend values nobody trained."""
from __future__ import annotations

import json
import math
from pathlib import Path

CONFIG_FILE = "config.json"  # written by the run (orchestrator/run/directory.py: pin_settings)
_MISSING = object()


def override_value(value) -> str:
    """A value as a Hydra override writes it (`0.001`, `true`, `null`, `{hidden:32,heads:2}`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf (a run never pins one: its checks refuse it)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return str(value)


def _select(tree, dotted: str):
    for part in dotted.split("."):
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return _MISSING
    return tree


def ran_config(run_dir: Path) -> dict | None:
    """The settings the member's run pinned; None if it never got so far."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _group_choices(run_dir: Path) -> dict:
    from omegaconf import OmegaConf
    path = Path(run_dir) / ".hydra" / "hydra.yaml"
    if not path.exists():
        return {}
    choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices", default=None)
    return dict(OmegaConf.to_container(choices)) if choices is not None else {}


def ran_values(run_dir: Path, keys: list[str]) -> dict[str, str] | None:
    """`key: value` (as overrides) of what the member in `run_dir` ran, for each of `keys`
    (dotted config keys, or config groups); None if the member never pinned its settings."""
    config = ran_config(run_dir)
    if config is None:
        return None
    values, choices = {}, None
    for key in keys:
        value = _select(config, key)
        if value is _MISSING:  # not a setting but a config group (`model=llama_small`)
            choices = _group_choices(run_dir) if choices is None else choices
            value = choices.get(key, _MISSING)
        if value is not _MISSING:
            values[key] = override_value(value)
    return values
