"""Fitting the loss law to proxies, with bootstrap intervals, and the verdict whether the
fit is a law at all.

L(N, D) = E + a (N/N0)^-alpha + b (D/D0)^-beta, the Chinchilla form (Hoffmann et al. 2022)
written at a reference size N0 and token count D0 (the proxies' geometric means): a and b
are the reducible loss the size and the data leave at the proxies' centre, so they are
measured, not extrapolated, and their intervals mean something (A = a N0^alpha, B = b
D0^beta are reported beside them). With one token count it is the fixed-token law
L(N) = E + a (N/N0)^-alpha, the data term folded into E.

Least squares of the relative residuals on the mean loss of each grid point (seeds
averaged), each weighted by the inverse of its relative standard error over seeds (short
runs scatter 10x more over seeds than long ones: an unweighted fit follows their noise;
with fewer than 2 seeds somewhere, equal weights), from several starts. Intervals: a
percentile bootstrap over points and seeds (each replicate draws the grid points with
replacement, redrawn until they still pin the law down - 3 sizes, and 3 token counts - and
for each point its seeds with replacement). A fit is not a law when a parameter sits at its bound (the optimizer
wanted a value the form does not allow: E = 0, an exponent of 0 or 3, a term of 0: the
points are flat, or data-limited, in that direction) or when a parameter's 95% interval
is wider than max_interval times its value (the points do not pin it down).

scipy is imported where it is used: `grow plan` reads fits without it.
"""
from __future__ import annotations

import math
import random

from orchestrator.budget.loss_law import (LAW, LAW_FIXED_TOKENS, LAW_KAPLAN, N_MEANING, FitError, Law,
                                        relative_error)

BOOTSTRAP_SAMPLES = 400
MAX_INTERVAL = 1.0  # a parameter's 95% interval may be as wide as its value, no wider
LEVEL = 0.95
EXPONENT_MAX = 3.0  # beyond it a term vanishes within a factor of 1.3 in size: no measured LM law is near
AT_BOUND = 1e-3  # relative distance from a bound that counts as on it
SE_FLOOR = 2e-3  # no grid point weighs more than one known to 0.2% (the validation loss's own noise)
FORMS = ("chinchilla", "kaplan")
NAMES = {"fixed": ("E", "a", "alpha"), "chinchilla": ("E", "a", "alpha", "b", "beta"),
         "kaplan": ("a", "alpha", "b", "beta")}


def _means(points: list[dict]) -> list[dict]:
    """One point per (N, tokens): the mean over seeds, the seeds' losses kept."""
    cells: dict[tuple, list[dict]] = {}
    for p in points:
        cells.setdefault((p["n"], p["tokens"]), []).append(p)
    out = [{"width": ps[0].get("width"), "n": n, "tokens": d, "loss": sum(p["loss"] for p in ps) / len(ps),
            "seed_losses": [p["loss"] for p in ps], "seeds": [p.get("seed") for p in ps],
            "members": [p.get("member") for p in ps]}
           for (n, d), ps in sorted(cells.items())]
    for c in out:
        c["rel_se"] = _rel_se(c["seed_losses"])
    weighted = all(c["rel_se"] is not None for c in out)
    for c in out:
        c["weight"] = 1 / max(c["rel_se"], SE_FLOOR) if weighted else 1.0
    mean = sum(c["weight"] for c in out) / len(out)
    for c in out:
        c["weight"] /= mean
    return out


def _rel_se(losses: list[float]) -> float | None:
    """The standard error of the mean over seeds, relative to the mean; None with one seed."""
    k = len(losses)
    if k < 2:
        return None
    mean = sum(losses) / k
    var = sum((x - mean) ** 2 for x in losses) / (k - 1)
    return math.sqrt(var / k) / mean


def _geomean(xs) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


class _Problem:
    """The points in reference units and the bounds of the parameters (NAMES[kind]):
    fixed: E + a x^-alpha; chinchilla: E + a x^-alpha + b t^-beta; kaplan: (a x^-alpha + b/t)^beta,
    x = N/N0, t = D/D0."""

    def __init__(self, cells: list[dict], n0: float, d0: float, kind: str):
        import numpy as np
        self.x = np.asarray([c["n"] for c in cells], float) / n0
        self.t = np.asarray([c["tokens"] for c in cells], float) / d0
        self.y = np.asarray([c["loss"] for c in cells], float)
        self.w = np.asarray([c.get("weight", 1.0) for c in cells], float)
        self.kind = kind
        ymin = float(self.y.min())
        big = 10 * float(self.y.max())
        if kind == "kaplan":  # the inner sum is L^(1/beta): no scale bounds a or b
            self.lo, self.hi = [0.0] * 4, [math.inf, EXPONENT_MAX, math.inf, EXPONENT_MAX]
        else:
            self.lo = [0.0, 0.0, 0.0] + ([0.0, 0.0] if kind == "chinchilla" else [])
            self.hi = [ymin, big, EXPONENT_MAX] + ([big, EXPONENT_MAX] if kind == "chinchilla" else [])

    def model(self, p):
        if self.kind == "kaplan":
            return (p[0] * self.x ** -p[1] + p[2] / self.t) ** p[3]
        out = p[0] + p[1] * self.x ** -p[2]
        return out + p[3] * self.t ** -p[4] if self.kind == "chinchilla" else out

    def residuals(self, p):
        return self.w * (self.model(p) - self.y) / self.y

    def solve(self, starts):
        from scipy.optimize import least_squares
        best = None
        for s in starts:
            s = [min(max(v, lo + 1e-9), hi - 1e-9) for v, lo, hi in zip(s, self.lo, self.hi)]
            try:
                r = least_squares(self.residuals, s, bounds=(self.lo, self.hi), method="trf", x_scale="jac",
                                  max_nfev=2000)
            except (ValueError, FloatingPointError):
                continue
            if best is None or r.cost < best.cost:
                best = r
        if best is None or not all(math.isfinite(v) for v in best.x):
            raise FitError(f"{LAW} did not converge on these points")
        return [float(v) for v in best.x]

    def default_starts(self):
        ymin, spread = float(self.y.min()), max(float(self.y.max() - self.y.min()), 1e-3)
        starts = []
        if self.kind == "kaplan":  # a and b: half the inner sum L^(1/beta) at the centre each
            for beta in (0.1, 0.3, 1.0):
                inner = float((self.y ** (1 / beta)).mean()) / 2
                starts += [[inner, alpha, inner, beta] for alpha in (0.5, 1.0)]
            return starts
        with_tokens = self.kind == "chinchilla"
        for e in (0.5 * ymin, 0.9 * ymin):
            for alpha in (0.3, 1.0):
                for beta in ((0.3, 1.0) if with_tokens else (None,)):
                    starts.append([e, spread, alpha] + ([spread, beta] if with_tokens else []))
        return starts


def _at_bound(problem: _Problem, params: list[float]) -> list[str]:
    names = NAMES[problem.kind]
    scale = float(problem.y.min())
    out = []
    for name, v, lo, hi in zip(names, params, problem.lo, problem.hi):
        if v - lo <= AT_BOUND * max(abs(lo), scale if name in ("E", "a", "b") else 1.0):
            out.append(f"{name} at its lower bound ({v:.3g} <= {lo:.3g})")
        elif math.isfinite(hi) and hi - v <= AT_BOUND * max(abs(hi), 1.0):
            out.append(f"{name} at its upper bound ({v:.3g} >= {hi:.3g})")
    return out


def _law(params: list[float], n0: float, d0: float, fixed_tokens: int | None, kind: str) -> Law:
    if kind == "fixed":
        e, a, alpha = params
        return Law(E=e, A=a * n0 ** alpha, alpha=alpha, tokens=fixed_tokens)
    if kind == "kaplan":
        a, alpha, b, beta = params
        return Law(E=0.0, A=a * n0 ** alpha, alpha=alpha, B=b * d0, beta=beta, form="kaplan")
    e, a, alpha, b, beta = params
    return Law(E=e, A=a * n0 ** alpha, alpha=alpha, B=b * d0 ** beta, beta=beta)


def _check_points(cells: list[dict], with_tokens: bool) -> None:
    sizes, counts = {c["n"] for c in cells}, {c["tokens"] for c in cells}
    if not all(math.isfinite(c["loss"]) for c in cells):
        raise FitError(f"a loss is not finite: {[c['loss'] for c in cells]}")
    if len(sizes) < 3:
        raise FitError(f"{len(sizes)} model sizes; the law needs at least 3")
    if with_tokens and len(counts) < 3:
        raise FitError(f"{len(counts)} token counts; {LAW} needs at least 3 (with 2, E and B/D^beta are one)")
    if with_tokens and len(cells) < 6:
        raise FitError(f"{len(cells)} points (sizes x token counts); {LAW} needs at least 6")


def _kind(cells: list[dict], form: str) -> str:
    """The law fitted to these cells: the fixed-token one when they share one token count."""
    return "fixed" if len({c["tokens"] for c in cells}) == 1 else form


def fit_points(cells: list[dict], form: str = "chinchilla") -> tuple[list[float], _Problem, float, float]:
    """(parameters, problem, N0, D0) of a least-squares fit to grid cells (seeds averaged)."""
    kind = _kind(cells, form)
    _check_points(cells, kind != "fixed")
    n0, d0 = _geomean({c["n"] for c in cells}), _geomean({c["tokens"] for c in cells})
    problem = _Problem(cells, n0, d0, kind)
    return problem.solve(problem.default_starts()), problem, n0, d0


def _resample(cells: list[dict], rng: random.Random, with_tokens: bool) -> list[dict]:
    """Grid points drawn with replacement, each with its seeds drawn with replacement; redrawn
    until the law can be fitted to it (3 sizes; 3 token counts: with 2, E and B/D^beta are one)."""
    for _ in range(1000):
        drawn = [rng.choice(cells) for _ in cells]
        if len({c["n"] for c in drawn}) >= 3 and (not with_tokens or len({c["tokens"] for c in drawn}) >= 3):
            out = []
            for c in drawn:
                seeds = [rng.choice(c["seed_losses"]) for _ in c["seed_losses"]]
                out.append({**c, "loss": sum(seeds) / len(seeds)})
            return out
    raise FitError("no bootstrap sample has enough distinct sizes and token counts")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def interval(values: list[float], level: float = LEVEL) -> tuple[float, float]:
    return _percentile(values, (1 - level) / 2), _percentile(values, (1 + level) / 2)


def bootstrap(cells: list[dict], params: list[float], n0: float, d0: float, samples: int, kind: str,
              seed: int = 0) -> tuple[list[list[float]], int]:
    """(parameters of each replicate fitted at the full fit's N0 and D0, the replicates that failed)."""
    rng = random.Random(seed)
    out, failed = [], 0
    for _ in range(samples):
        drawn = _resample(cells, rng, kind != "fixed")
        problem = _Problem(drawn, n0, d0, kind)
        try:
            out.append(problem.solve([params] + problem.default_starts()[:2]))
        except FitError:
            failed += 1
    if len(out) < samples // 2:
        raise FitError(f"{failed} of {samples} bootstrap fits failed")
    return out, failed


def _held_out(cells: list[dict], what: str, keep, target, form: str) -> dict | None:
    """The law fitted without some cells, on the one it left out."""
    rest = [c for c in cells if keep(c)]
    try:
        params, problem, n0, d0 = fit_points(rest, form)
    except FitError:
        return None
    if problem.kind == "fixed" and target["tokens"] != rest[0]["tokens"]:
        return None  # a fixed-token law says nothing at other tokens
    law = _law(params, n0, d0, rest[0]["tokens"], problem.kind)
    predicted = law(target["n"], target["tokens"])
    return {"what": what, "width": target["width"], "n": target["n"], "tokens": target["tokens"],
            "loss": target["loss"], "predicted": predicted, "rel_error": relative_error(predicted, target["loss"]),
            "fit_without_it": law.to_dict()}


def held_out_checks(cells: list[dict], form: str = "chinchilla") -> list[dict]:
    """The widest proxies held out (4 or more sizes) and the longest runs held out (4 or more
    token counts): each checked at its largest size and token count. With fewer, the rest
    would not pin down the law (3 sizes for E, A, alpha; 3 token counts for E, B, beta)."""
    sizes, counts = sorted({c["n"] for c in cells}), sorted({c["tokens"] for c in cells})
    out = []
    if len(sizes) >= 4:
        top = max((c for c in cells if c["n"] == sizes[-1]), key=lambda c: c["tokens"])
        out.append(_held_out(cells, f"the widest proxy (width {top['width']})", lambda c: c["n"] != sizes[-1], top,
                             form))
    if len(counts) >= 4:
        top = max((c for c in cells if c["tokens"] == counts[-1]), key=lambda c: c["n"])
        out.append(_held_out(cells, f"the longest runs ({counts[-1]:,} tokens)", lambda c: c["tokens"] != counts[-1],
                             top, form))
    return [h for h in out if h is not None]


def _parameter(value: float, values: list[float], max_interval: float, bound: str | None) -> dict:
    lo, hi = interval(values)
    rel_width = (hi - lo) / abs(value) if value else math.inf
    return {"value": value, "lo": lo, "hi": hi, "rel_width": rel_width, "at_bound": bound,
            "too_wide": rel_width > max_interval}


def fit_report(points: list[dict], samples: int = BOOTSTRAP_SAMPLES, max_interval: float = MAX_INTERVAL,
               form: str = "chinchilla", seed: int = 0) -> dict:
    """`points`: {"n", "tokens", "loss", "width"?, "seed"?, "member"?} per proxy run. The fit
    with its intervals, its bootstrap laws, the held-out checks and the verdict. `form`:
    chinchilla, or kaplan (for proxies far from the loss floor; see loss_law.LAW_KAPLAN)."""
    if form not in FORMS:
        raise FitError(f"form {form!r}: not one of {', '.join(FORMS)}")
    cells = _means(points)
    params, problem, n0, d0 = fit_points(cells, form)
    kind = problem.kind
    fixed = cells[0]["tokens"] if kind == "fixed" else None
    law = _law(params, n0, d0, fixed, kind)
    reps, failed = bootstrap(cells, params, n0, d0, samples, kind, seed)
    bounds = {b.split(" ")[0]: b for b in _at_bound(problem, params)}
    parameters = {k: _parameter(v, [r[i] for r in reps], max_interval, bounds.get(k))
                  for i, (k, v) in enumerate(zip(NAMES[kind], params))}
    laws = [_law(r, n0, d0, fixed, kind) for r in reps]
    derived = {"A": _parameter(law.A, [x.A for x in laws], math.inf, None)}
    if fixed is None:
        derived["B"] = _parameter(law.B, [x.B for x in laws], math.inf, None)
    problems = list(bounds.values()) + [
        f"{k}'s 95% interval [{p['lo']:.3g}, {p['hi']:.3g}] is {p['rel_width']:.2f}x its value "
        f"(limit {max_interval:g})" for k, p in parameters.items() if p["too_wide"]]
    if "E" in bounds and bounds["E"].startswith("E at its lower bound") and kind == "chinchilla":
        problems[0] += " - no loss floor within these proxies' reach (predict.form=kaplan has none)"
    return {"law": {"fixed": LAW_FIXED_TOKENS, "chinchilla": LAW, "kaplan": LAW_KAPLAN}[kind], "form": kind,
            "n": N_MEANING, **law.to_dict(), "reference": {"N0": n0, "D0": d0}, "parameters": parameters,
            "derived": derived, "level": LEVEL, "max_interval": max_interval, "lawful": not problems,
            "verdict": "; ".join(problems) if problems else
            f"no parameter at a bound, every 95% interval within {max_interval:g}x its value",
            "bootstrap": {"samples": samples, "failed": failed, "laws": [x.to_dict() for x in laws]},
            "points": cells, "finished": len(points), "token_counts": sorted({c["tokens"] for c in cells}),
            "held_out": held_out_checks(cells, form)}
