"""The loss of a grown schedule from a law in size and tokens: each stage carries the tokens
a model of its size would have needed to reach the loss the stage before ended at.

A function-preserving growth (msg, zero, clone) hands the next stage a model with the loss
the smaller one reached, L(N_i, D_i'). The law says how many tokens a model of the new
size N_{i+1} trained from scratch needs to reach that loss:
    B / D'^beta = B / D_i'^beta + A / N_i^alpha - A / N_{i+1}^alpha,
so the next stage ends at L(N_{i+1}, D' + D_{i+1}). That is the law's own account of the
tokens each stage saw at its size, with no free parameter. What it leaves out - the earlier
stages end at their peak learning rate (not annealed, as the law's proxies are), the loss
a growth's new units cost until their masks ramp in, the re-warm - is measured on small
grown schedules as a relative correction of the final loss (bench/loss_prediction.py):
    L_final = L(N_k, D_k') x (1 + correction).
A multiplicative correction because the gap it stands for scales with the reducible loss
of the schedule's stages, which the law already puts in proportion; it is measured at
the schedule's shape ratios and token split, and carried to larger ones as a ratio.
"""
from __future__ import annotations

import math
from typing import Protocol


class SizeTokenLaw(Protocol):
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    form: str

    def __call__(self, n: float, d: float | None = None) -> float: ...


def carried_tokens(law: SizeTokenLaw, n_before: float, d_before: float, n_after: float) -> float:
    """The tokens a model of n_after needs to reach the loss a model of n_before reaches on
    d_before tokens (fewer when it is larger). Closed form for the Chinchilla law; any other
    law falling in D is solved for it (bisection in log D)."""
    if law.form == "chinchilla":
        data_term = law.B * d_before ** -law.beta + law.A * (n_before ** -law.alpha - n_after ** -law.alpha)
        if data_term <= 0:  # the larger model's size term alone is above that loss: it is reached at once
            return 0.0
        return (law.B / data_term) ** (1 / law.beta)
    target = law(n_before, d_before)
    lo, hi = math.log(1e-6), math.log(max(d_before, 1.0)) + 1.0
    if law(n_after, math.exp(lo)) <= target:
        return 0.0
    while law(n_after, math.exp(hi)) > target:  # a smaller model after "growth": more tokens
        hi += 1.0
        if hi > 120:  # not reached on any number of tokens
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if law(n_after, math.exp(mid)) > target else (lo, mid)
    return math.exp((lo + hi) / 2)


def grown_losses(law: SizeTokenLaw, stages: list[tuple[float, float]], correction: float = 0.0) -> list[dict]:
    """`stages`: (N, tokens) of each stage in order. The loss at the end of each stage (the
    law at the tokens it carries), the final one corrected; each with the tokens it carried
    in and its effective tokens."""
    out, n_prev, d_eff = [], None, 0.0
    for i, (n, d) in enumerate(stages):
        carried = 0.0 if n_prev is None else carried_tokens(law, n_prev, d_eff, n)
        d_eff = carried + d
        loss = law(n, d_eff)
        if i == len(stages) - 1 and len(stages) > 1:
            loss *= 1 + correction
        out.append({"carried_tokens": carried, "effective_tokens": d_eff, "loss": loss})
        n_prev = n
    return out
