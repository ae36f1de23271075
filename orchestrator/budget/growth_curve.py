"""What growth saved when measured, at a plan's tokens per parameter.

bench/growth_curve.py measures, at several tokens per parameter of a small final model, the
FLOPs a function-preserving growth schedule needs to reach a tuned scratch run's final
validation loss, over scratch's (`flops_frac`: the point's "best", msg at its best growth
timing, mean over seeds). Its JSON ships with the package (package_data.GROWTH_CURVE).
`grow plan` prints the figure at the plan's tokens per parameter beside the FLOPs it computes:
interpolated linearly in log(tokens per parameter) between the two measured points around it;
outside the measured range, or next to a point where growth did not reach scratch's loss in
every seed, it says so instead of guessing.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.package_data import GROWTH_CURVE

SOURCE = "bench/growth_curve.py"


@dataclass(frozen=True)
class MeasuredSaving:
    tokens_per_param: float  # the plan's: its tokens over the final model's parameters
    flops_frac: float | None  # None: no measured figure there (see `note`)
    std: float | None  # across seeds, interpolated like the mean
    lo: float | None  # the measured range of tokens per parameter
    hi: float | None
    params: int | None  # the final model the curve was measured at
    source: str
    note: str  # the line `grow plan` prints

    def to_dict(self) -> dict:
        return asdict(self)


def read_curve(path: Path | None = None) -> dict | None:
    """The curve's JSON (the shipped one by default), or None when the file is absent or
    unreadable (then there is no figure)."""
    try:
        return json.loads(Path(path or GROWTH_CURVE).read_text())
    except (OSError, ValueError):
        return None


def curve_points(curve: dict) -> list[tuple[float, float | None, float | None, str]]:
    """(tokens per parameter, flops_frac mean or None, std, operator at its split), sorted."""
    pts = []
    for p in curve.get("points", []):
        best = p["best"]
        pts.append((float(p["tokens_per_param"]), best["flops_frac"]["mean"], best["flops_frac"]["std"],
                    f"{best['operator']} at split {best['split']}"))
    return sorted(pts)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def measured_saving(tokens_per_param: float, curve: dict | None, path: Path | str | None = None
                    ) -> MeasuredSaving | None:
    """The measured flops_frac at `tokens_per_param` on `curve` (read from `path`, the shipped
    file by default), or a note saying why there is none; None when there is no curve at all."""
    if not curve or not curve_points(curve):
        return None
    path = path or GROWTH_CURVE
    pts = curve_points(curve)
    lo, hi, params = pts[0][0], pts[-1][0], curve.get("params")
    where = (f"measured {_fmt(lo)}-{_fmt(hi)} tokens/param at a {params / 1e3:.0f}k-parameter final model "
             f"({SOURCE} -> {Path(path).name})" if params else f"measured {_fmt(lo)}-{_fmt(hi)} tokens/param")

    def result(frac, std, note):
        return MeasuredSaving(tokens_per_param, frac, std, lo, hi, params, str(path), note)

    t = tokens_per_param
    if not (lo <= t <= hi) or t <= 0:
        return result(None, None, f"measured saving: none at {_fmt(t)} tokens/param, outside the measured range "
                                  f"({where}); not extrapolated")
    exact = [p for p in pts if math.isclose(p[0], t, rel_tol=1e-9)]
    # a measured point stands for itself, whatever its neighbours; else the two around
    left, right = (exact[0], exact[0]) if exact else next((a, b) for a, b in zip(pts, pts[1:]) if a[0] < t < b[0])
    (x0, f0, s0, op0), (x1, f1, s1, op1) = left, right
    if f0 is None or f1 is None:
        never = _fmt(x0) if f0 is None else _fmt(x1)
        return result(None, None, f"measured saving: none at {_fmt(t)} tokens/param: growth did not reach "
                                  f"scratch's loss in every seed at {never} tokens/param ({where})")
    w = 0.0 if x1 == x0 else (math.log(t) - math.log(x0)) / (math.log(x1) - math.log(x0))
    frac = f0 + w * (f1 - f0)
    std = None if s0 is None or s1 is None else s0 + w * (s1 - s0)
    ops = op0 if op0 == op1 or w == 0 else f"{op0} / {op1}"
    pm = "" if std is None else f" +- {std:.2f}"
    return result(frac, std, f"measured saving at {_fmt(t)} tokens/param: growth reached scratch's loss with "
                             f"{frac:.2f}{pm} of its FLOPs ({100 * (1 - frac):.0f}% saved; {ops}; {where})")
