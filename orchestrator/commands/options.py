"""`key=value` arguments of the offline commands, and how their failures reach the user:
one line `grow: <command>: <key>: <what is wrong>` and an exit status (2 bad input, 1 a
damaged or unreadable file, 3 a growth that changed the function), never a traceback."""
from __future__ import annotations

import errno
from typing import Callable

from orchestrator.exits import EXIT_CONFIG, EXIT_FAILED, EXIT_GROWTH_CHECK, UsageError, fail as report

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_options(args: list[str], required: tuple[str, ...], allowed: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for a in args:
        if "=" not in a:
            raise UsageError(f"expected key=value, got {a!r}; allowed keys: {', '.join(allowed)}")
        k, v = a.split("=", 1)
        if k not in allowed:
            raise UsageError(f"{k}: unknown key; allowed: {', '.join(allowed)}")
        out[k] = v
    missing = [k for k in required if k not in out]
    if missing:
        raise UsageError(f"{missing[0]}: required")
    return out


def int_option(opts: dict[str, str], key: str, default: int | None = None, minimum: int | None = None) -> int:
    raw = opts.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{key}: {raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise UsageError(f"{key}: {value} is not allowed; allowed: >= {minimum}")
    return value


def float_option(opts: dict[str, str], key: str, default: float, minimum: float = 0.0) -> float:
    raw = opts.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{key}: {raw!r} is not a number") from None
    if not value >= minimum:  # also refuses nan
        raise UsageError(f"{key}: {raw} is not allowed; allowed: >= {minimum:g}")
    return value


def bool_option(opts: dict[str, str], key: str, default: bool) -> bool:
    raw = opts.get(key)
    if raw is None:
        return default
    if raw.lower() not in TRUE + FALSE:
        raise UsageError(f"{key}: {raw!r} is not a boolean; allowed: true, false")
    return raw.lower() in TRUE


def run_reporting_errors(command: str, body: Callable[[], int]) -> int:
    """Run a command body; known failures become one line on stderr and an exit status.
    Heavy imports stay inside (torch, safetensors), so `grow --help` does not load them."""
    from safetensors import SafetensorError

    from growth_ops import GrowthError
    from orchestrator.checkpoint.canonical import CheckpointError
    from orchestrator.offline.check import FunctionChangedError
    from orchestrator.offline.outputs import OfflineError

    def fail(code: int, message: str) -> int:
        return report(code, f"{command}: {message}")

    try:
        return body()
    except (UsageError, OfflineError, GrowthError) as e:
        return fail(EXIT_CONFIG, str(e))
    except FunctionChangedError as e:
        return fail(EXIT_GROWTH_CHECK, str(e))
    except CheckpointError as e:
        return fail(EXIT_FAILED, f"checkpoint error: {e}; nothing was written")
    except SafetensorError as e:
        return fail(EXIT_FAILED, f"damaged safetensors file: {e}; nothing was written")
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        full = " - free space and run again" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return fail(EXIT_FAILED, f"{e.strerror or e}{where}; nothing was written{full}")
