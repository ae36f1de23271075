"""Constraints declared beside a schema field (`Annotated[int, Positive()]`).

The parser (orchestrator.config.parse) applies them as it builds each field, so a value's
own limits - finite, range, choice, pattern - live where the field is defined, and each
domain's checks (registered in orchestrator.config.checks) are left with what relates
several fields. Every constraint raises ConfigError naming the full key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from orchestrator.config.errors import ConfigError


@dataclass(frozen=True)
class Positive:
    """> 0 (>= 0 with `zero`); None passes (an Optional field left unset)."""

    zero: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is not None and (value < 0 or (value == 0 and not self.zero)):
            raise ConfigError(key, f"must be {'>= 0' if self.zero else '> 0'}, got {value}")


NonNegative = Positive(zero=True)


@dataclass(frozen=True)
class OneOf:
    """One of `allowed` (compared as given; ints may be given as their string form)."""

    allowed: tuple

    def __init__(self, *allowed):
        object.__setattr__(self, "allowed", allowed)

    def check(self, key: str, value: Any) -> None:
        if value not in self.allowed:
            raise ConfigError(key, f"{value!r} is not allowed; allowed: {', '.join(map(str, self.allowed))}")


@dataclass(frozen=True)
class Within:
    """lo <(=) value <(=) hi. `message` may use {value} and {interval} (e.g. "(0, 1]")."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    message: str = "must be in {interval}, got {value}"

    def check(self, key: str, value: Any) -> None:
        if value is None:
            return
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        if not (above and below):
            interval = f"{'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}{')' if self.hi_open else ']'}"
            raise ConfigError(key, self.message.format(value=value, interval=interval))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Matches:
    """A string matching `pattern` (re.match); None passes."""

    pattern: str
    message: str  # may use {value}

    def check(self, key: str, value: Any) -> None:
        if value is not None and not re.match(self.pattern, value):
            raise ConfigError(key, self.message.format(value=value))


@dataclass(frozen=True)
class NotEmpty:
    """A list or mapping with at least one entry."""

    message: str

    def check(self, key: str, value: Any) -> None:
        if not value:
            raise ConfigError(key, self.message)


ONE_LINE = Matches(r"^[^\n]*$", "one line per entry (no newlines)")
