"""Rules a growth target must satisfy whatever the operator: same architecture and
parametrization, no shrinking, a fixed head dimension, kv heads dividing heads."""
from __future__ import annotations

from .errors import GrowthError
from .spec import ARCHITECTURE, PARAMETRIZATION, ModelSpec

ARCH_FIELDS = (*ARCHITECTURE, *PARAMETRIZATION, "vocab")
SHAPE_FIELDS = ("layers", "hidden", "ffn", "heads", "kv_heads")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_common(old: ModelSpec, new: ModelSpec) -> None:
    """Rules of every operator: same architecture, no shrinking, fixed head dim, kv heads
    dividing heads."""
    for f in ARCH_FIELDS:
        a, b = getattr(old, f), getattr(new, f)
        if a != b:
            raise GrowthError(f, f"growth cannot change the architecture ({a!r} -> {b!r}); allowed: {a!r}")
    for f in SHAPE_FIELDS:
        a, b = getattr(old, f), getattr(new, f)
        if b < a:
            raise GrowthError(f, f"cannot shrink ({a} -> {b}); allowed: >= {a}")
    if new.head_dim != old.head_dim:
        raise GrowthError("head_dim", f"must stay {old.head_dim}: growth adds heads, it never "
                                      f"changes the head dimension; allowed: {old.head_dim}")
    if new.heads % new.kv_heads:
        raise GrowthError("kv_heads", f"{new.kv_heads} does not divide heads={new.heads}; "
                                      f"allowed: {', '.join(map(str, divisors(new.heads)))}")


def check_group(old: ModelSpec, new: ModelSpec) -> None:
    """Placement operators keep every old query head on its kv head: the group size may grow."""
    if new.group_size < old.group_size:
        allowed = [k for k in divisors(new.heads) if new.heads // k >= old.group_size and k >= old.kv_heads]
        raise GrowthError("kv_heads", f"query heads per kv head cannot fall ({old.group_size} -> "
                                      f"{new.group_size}): old query heads must keep their kv head; "
                                      f"allowed: {', '.join(map(str, allowed)) or 'none'}")


def check_choice(field_: str, value, allowed: tuple[str, ...], op: str) -> None:
    if value not in allowed:
        raise GrowthError(field_, f"{value!r} is not supported by {op}; allowed: {', '.join(allowed)}")
