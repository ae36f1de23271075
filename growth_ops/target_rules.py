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


def check_experts(old: ModelSpec, new: ModelSpec, operator: str, upcycles: bool) -> None:
    """Mixtures of experts: only an upcycling operator turns a dense FFN into experts, and a
    mixture never goes back to dense, changes its expert count or grows (not yet: grow the
    dense model, then upcycle)."""
    if old.is_moe:
        if not new.is_moe:
            raise GrowthError("experts", f"cannot go from {old.experts} experts back to a dense FFN; "
                                         f"allowed: {old.experts}")
        if new.experts != old.experts:
            raise GrowthError("experts", f"the model already has {old.experts} experts: growth cannot change "
                                         f"the expert count ({old.experts} -> {new.experts}); allowed: {old.experts}")
        if new.top_k != old.top_k:
            raise GrowthError("top_k", f"cannot change ({old.top_k} -> {new.top_k}) once the model has experts; "
                                       f"allowed: {old.top_k}")
        raise GrowthError("operator", f"{operator} cannot grow a mixture of experts (wider or deeper experts "
                                      "are not supported yet): grow the dense model, then upcycle; allowed: "
                                      "the stage before's shape")
    if new.is_moe and not upcycles:
        raise GrowthError("operator", f"{operator} keeps the FFN dense but the stage has {new.experts} experts; "
                                      "allowed: upcycle, drop_upcycle")
    if upcycles and not new.is_moe:
        raise GrowthError("experts", f"{operator} turns the dense FFN into experts: the stage needs "
                                     "moe.experts >= 2; allowed: a stage with moe set")


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
