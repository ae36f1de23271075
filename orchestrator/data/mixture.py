"""Which source each sequence comes from: a pure function of (sequence number, weights).

Requirements: (1) resuming from a cursor reproduces the stream, so the pick may depend
only on the sequence number s and the weights, never on history kept in memory; (2) the
realised mix tracks the weights tightly, not just on average: over every prefix of n
sequences each source k gets c_k(n) with |c_k(n) - n*w_k| < 1; (3) picking for
s ~ 1e9 costs the same as for s = 0.

Sturmian (floor-based) sequences give (1)-(3) for two sources, but for three or more,
rounding each source separately does not add up to one pick per step. So the weights are
turned into exact integer shares a_k over a period D = sum(a_k) and one period is
scheduled once with the quota method (earliest deadline first: at step t the source
whose next pick is most urgent, among those not ahead of their quota). Tijdeman (1980,
"The chairman assignment problem") shows a schedule within 1 - 1/(2K-2) of the quota
always exists, and EDF finds a feasible schedule of unit jobs whenever one exists, so
the bound holds at every step; at t = D every count equals its share exactly, so the
schedule repeats and pick(s) = table[s mod D].

Weights are read as rationals (Fraction.limit_denominator(10**6): 0.7 is 7/10, 1/3
written as 0.333... is 1/3). When their common period would exceed MAX_PERIOD the shares
are rounded to MAX_PERIOD (largest remainder); the realised mix is then off by at most
about 1/MAX_PERIOD of the weight, still within one sequence over the first MAX_PERIOD.
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

from orchestrator.data.errors import DataError

MAX_PERIOD = 1 << 16


RATIO_TOLERANCE = 1e-6  # how far from 1 the ratios may sum: float rounding, not a looser mix


def check_ratios(ratios: dict[str, float], names, what: str = "mixture") -> None:
    """Raise DataError unless `ratios` maps known `names` to finite numbers >= 0, at least
    one positive, that sum to 1 (within RATIO_TOLERANCE). The error's key is the name at
    fault (None when it is the sum). Ratios, not weights: 0.7 / 0.2 is a mistake
    (the 0.1 left out), and normalising it silently would train on another mix."""
    known = sorted(names)
    for name, w in ratios.items():
        if name not in known:
            raise DataError(f"{what}: unknown source {name!r}; sources: {', '.join(known) or 'none'}", name)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise DataError(f"{what}: the ratio of {name!r} must be a finite number >= 0, got {w!r}", name)
    if not any(w > 0 for w in ratios.values()):
        raise DataError(f"{what}: needs at least one positive ratio")
    total = math.fsum(ratios.values())
    if abs(total - 1.0) > RATIO_TOLERANCE:
        shown = " + ".join(f"{n} {w:g}" for n, w in ratios.items())
        raise DataError(f"{what}: the ratios must sum to 1, got {shown} = {total:.6g}")


def resolve_weights(names: list[str], mixture: dict[str, float] | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(names, weights) of the sources that take part, sorted by name.

    None: equal shares over `names`. Otherwise the ratios of `check_ratios`; a zero ratio
    excludes a source."""
    if mixture is None:
        if not names:
            raise DataError("no training streams to read from")
        chosen = sorted(names)
        return tuple(chosen), tuple(1.0 for _ in chosen)
    check_ratios(mixture, names)
    chosen = sorted(n for n, w in mixture.items() if w > 0)
    return tuple(chosen), tuple(float(mixture[n]) for n in chosen)


def integer_shares(weights: tuple[float, ...]) -> tuple[int, ...]:
    """Coprime integers proportional to `weights` (see the module docstring)."""
    fr = [Fraction(w).limit_denominator(10**6) for w in weights]
    if all(f > 0 for f in fr):
        lcm = math.lcm(*(f.denominator for f in fr))
        ints = [int(f * lcm) for f in fr]
        g = math.gcd(*ints)
        ints = [i // g for i in ints]
        if sum(ints) <= MAX_PERIOD:
            return tuple(ints)
    total = sum(weights)
    quotas = [w / total * MAX_PERIOD for w in weights]
    ints = [max(1, math.floor(q)) for q in quotas]
    by_remainder = sorted(range(len(ints)), key=lambda k: quotas[k] - math.floor(quotas[k]), reverse=True)
    for k in by_remainder[:max(0, MAX_PERIOD - sum(ints))]:
        ints[k] += 1
    g = math.gcd(*ints)
    return tuple(i // g for i in ints)


@lru_cache(maxsize=64)
def period_table(shares: tuple[int, ...]) -> np.ndarray:
    """Source index of each step of one period, by earliest deadline first.

    In step t (1-based) source k's next pick (its c_k+1-th) may happen once
    c_k < t*a_k/D (else it would run ahead of its quota) and must happen before
    t > (c_k+1)*D/a_k (else it would fall behind); among the released ones the earliest
    deadline, i.e. smallest (c_k+1)/a_k, goes, ties to the lower index."""
    period = sum(shares)
    k_range = range(len(shares))
    counts = [0] * len(shares)
    table = np.empty(period, dtype=np.int32)
    for t in range(1, period + 1):
        best = -1
        for k in k_range:
            if counts[k] * period < t * shares[k] and (
                    best < 0 or (counts[k] + 1) * shares[best] < (counts[best] + 1) * shares[k]):
                best = k
        table[t - 1] = best
        counts[best] += 1
    table.flags.writeable = False
    return table


class Schedule:
    """pick(s) -> index into `names` of the source of sequence s, O(1) for any s."""

    def __init__(self, names: tuple[str, ...], weights: tuple[float, ...]):
        self.names, self.weights = names, weights
        self.shares = integer_shares(weights)
        self.table = period_table(self.shares)
        self.period = len(self.table)

    def pick(self, s: int) -> int:
        return int(self.table[s % self.period])

    def picks(self, start: int, n: int) -> np.ndarray:
        """Source indices of sequences start .. start+n-1."""
        return self.table[(np.arange(n, dtype=np.int64) + start % self.period) % self.period]
