"""Parse: a composed Hydra config (or a plain dict) -> the typed `RunConfig`.

The first step of every command (parse -> resolve -> check): unknown keys, types, values
that do not fit 64 bits or are not finite, and each field's declared constraints
(orchestrator.config.constraints), in one pass over the schema. Nothing above the config
layer is consulted here.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig

INT_RANGE = (-(2**63), 2**63 - 1)  # what every consumer (torch, numpy, JSON readers) can hold


def _hints(tp) -> dict:
    return typing.get_type_hints(tp, include_extras=True)


def _build(tp: Any, value: Any, key: str) -> Any:
    if typing.get_origin(tp) is typing.Annotated:
        built = _build(typing.get_args(tp)[0], value, key)
        for constraint in tp.__metadata__:
            constraint.check(key, built)
        return built
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _build(next(a for a in args if a is not type(None)), value, key)
    if value is None:
        raise ConfigError(key, f"must be set (expected {_type_name(tp)})")
    if value == "???":
        raise ConfigError(key, "is required and missing")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping with keys {_field_names(tp)}")
        hints = _hints(tp)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}" if key else unknown[0],
                              f"unknown key; allowed: {', '.join(_field_names(tp))}")
        kwargs = {f.name: _build(hints[f.name], value[f.name], f"{key}.{f.name}".lstrip("."))
                  for f in dataclasses.fields(tp) if f.name in value}
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_build(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise ConfigError(key, f"expected an integer, got {value!r}")
            value = int(value)  # 1e6 in YAML/overrides
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise ConfigError(key, f"{value} does not fit in 64 bits")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # no field gives infinity or NaN a meaning (null: no cap)
            raise ConfigError(key, f"must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp} not supported")  # a bug in schema.py, not user input


def _bare(tp):
    """The dataclass, list or dict type under Annotated/Optional wrappers."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def allowed_keys(key: str) -> list[str] | None:
    """The keys the schema allows beside `key` (a dotted path), or None if unknown."""
    tp: Any = RunConfig
    for part in key.split(".")[:-1]:
        tp = _bare(tp)
        if dataclasses.is_dataclass(tp):
            tp = _hints(tp).get(part)
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        if tp is None:
            return None
    tp = _bare(tp)
    return _field_names(tp) if dataclasses.is_dataclass(tp) else None


def _field_names(tp) -> list[str]:
    return [f.name for f in dataclasses.fields(tp)]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def parse(raw: DictConfig | dict) -> RunConfig:
    """A composed config (Hydra's keys ignored) as the typed RunConfig, or ConfigError."""
    if isinstance(raw, DictConfig):
        try:
            raw = OmegaConf.to_container(raw, resolve=True)
        except Exception as e:  # an interpolation that cannot resolve
            key = getattr(e, "full_key", None) or "config"
            raise ConfigError(str(key), str(e).splitlines()[0]) from None
    return _build(RunConfig, {k: v for k, v in raw.items() if k != "hydra"}, "")


def composition_error(e: Exception) -> ConfigError:
    """A Hydra/OmegaConf error from composing overrides, as a one-line ConfigError naming
    the key (and for an unknown key, the allowed ones)."""
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    key = key.replace("[", ".").replace("]", "") if key else None
    first = " ".join(str(cause).split()) or type(cause).__name__
    typed = re.search(r"dict is not a subclass of (\w+)", first)
    if typed and key:  # OmegaConf names only the new entry: find the mapping it went into
        key = ".".join(p for p in (_mapping_of(typed.group(1)), key) if p)
    if key and (typed or "not in struct" in first or re.search(r"Key '\w+' not in '\w+'", first)):
        if _in_mapping(key):
            return ConfigError(key, NEW_ENTRY)
        allowed = allowed_keys(key)
        first = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    return ConfigError(key or "overrides", first.split(" full_key:")[0].split(" Config search path:")[0])


# Hydra cannot add an entry to a mapping of typed entries (data.sources) from the command
# line (OmegaConf refuses a plain dict there); a config file can.
NEW_ENTRY = ("no such entry, and the command line cannot add one; set the keys of an existing entry "
             "(e.g. data=files data.sources.mine.paths=[...]), or add it in your own config file: "
             "--config-dir DIR with DIR/data/<name>.yaml, then data=<name>")


def _mappings(tp: Any = RunConfig, path: str = "") -> dict[str, Any]:
    """Dotted path -> entry type of every mapping of dataclasses in the schema."""
    found = {}
    tp = _bare(tp)
    if typing.get_origin(tp) is dict and dataclasses.is_dataclass(_bare(typing.get_args(tp)[1])):
        found[path] = _bare(typing.get_args(tp)[1])
    elif dataclasses.is_dataclass(tp):
        for name, hint in _hints(tp).items():
            found.update(_mappings(hint, f"{path}.{name}".lstrip(".")))
    return found


def _mapping_of(entry_type: str) -> str | None:
    return next((p for p, t in _mappings().items() if t.__name__ == entry_type), None)


def _in_mapping(key: str) -> bool:
    """Whether `key` names an entry (not a field of one) of a mapping of dataclasses."""
    return key.rpartition(".")[0] in _mappings()


# OmegaConf raises bare AssertionError/AttributeError for some bad overrides (a key added
# under a null node); Hydra and OmegaConf raise their own for the rest.
COMPOSITION_ERRORS = (AssertionError, AttributeError)
