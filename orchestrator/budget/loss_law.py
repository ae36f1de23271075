"""The loss of a model from its size and training tokens, L(N, D) = E + A/N^alpha + B/D^beta,
fitted to proxies of several widths and token counts (FLM-101B's loss prediction, in the
Chinchilla form); with one token count, L(N) = E + A/N^alpha at those tokens. The fit
itself, its intervals and its verdict are in law_fit.py; a grown schedule's loss in grown.py.

N is the number of non-embedding parameters (blocks and final norm; no embedding, no
untied head): at proxy widths with a 256-entry byte vocabulary the embeddings are a large,
width-linear share of the count that does not buy loss the way block parameters do
(Kaplan et al. 2020 fit non-embedding parameters for the same reason). D is the tokens a
run trains on.

No torch here: `grow plan` reads a fit without loading it. scipy and matplotlib are
imported where they are used.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from growth_ops.spec import VOCAB, ModelSpec, axis_size, parameter_axes

from orchestrator.budget.grown import grown_losses
from orchestrator.config.errors import ConfigError

LAW = "L(N, D) = E + A/N^alpha + B/D^beta"
LAW_FIXED_TOKENS = "L(N) = E + A/N^alpha (at the proxies' tokens)"
# Kaplan et al. 2020 (eq. 1.5), written with alpha = alpha_N/alpha_D and beta = alpha_D: no
# irreducible term, for proxies far above the loss floor, where E is not measurable
LAW_KAPLAN = "L(N, D) = (A/N^alpha + B/D)^beta"
N_MEANING = "non-embedding parameters"
MIN_SIZES = 3


class FitError(ValueError):
    """Too few points, or points the law cannot fit."""


def non_embedding_parameters(spec: ModelSpec) -> int:
    """Parameters of every tensor without a vocabulary axis (the N of the fit)."""
    total = 0
    for kinds in parameter_axes(spec).values():
        if VOCAB not in kinds:
            total += math.prod(axis_size(spec, k) for k in kinds)
    return total


@dataclass(frozen=True)
class Law:
    """chinchilla: E + A/N^alpha + B/D^beta; a fixed-token law (B = 0) holds at `tokens` only.
    kaplan: (A/N^alpha + B/D)^beta (E unused)."""
    E: float
    A: float
    alpha: float
    B: float = 0.0
    beta: float = 0.0
    tokens: int | None = None
    form: str = "chinchilla"

    def __call__(self, n: float, d: float | None = None) -> float:
        if self.form == "kaplan":
            return (self.A * n ** -self.alpha + self.B / d) ** self.beta
        loss = self.E + self.A * n ** -self.alpha
        return loss + self.B * d ** -self.beta if self.B and d is not None else loss

    @property
    def in_tokens(self) -> bool:
        return self.tokens is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Law":
        return cls(**{k: d[k] for k in ("E", "A", "alpha", "B", "beta", "tokens")}, form=d.get("form", "chinchilla"))


def relative_error(predicted: float, actual: float) -> float:
    return abs(predicted - actual) / actual


def law_of(fit: dict) -> Law:
    return Law.from_dict(fit)


def bootstrap_laws(fit: dict) -> list[Law]:
    return [Law.from_dict(d) for d in fit["bootstrap"]["laws"]]


def _interval(values: list[float], level: float) -> tuple[float, float]:
    values = sorted(values)

    def at(q: float) -> float:
        k = (len(values) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return values[lo] + (values[hi] - values[lo]) * (k - lo)
    return at((1 - level) / 2), at((1 + level) / 2)


def schedule_prediction(fit: dict, stages: list[tuple[float, float]]) -> list[dict]:
    """`stages`: (N, tokens) of each stage. The loss predicted at the end of each (a grown
    schedule through grown.py, its final stage corrected by the fit's growth_correction),
    with the interval of the same prediction under each bootstrap law. A fixed-token law
    predicts each stage's size at the proxies' tokens, whatever the stage's."""
    correction = fit.get("growth_correction") or 0.0
    law = law_of(fit)

    def losses(lw: Law) -> list[float]:
        if not lw.in_tokens:
            return [lw(n) for n, _ in stages]
        return [s["loss"] for s in grown_losses(lw, stages, correction)]
    point = losses(law)
    samples = [losses(lw) for lw in bootstrap_laws(fit)]
    level = fit.get("level", 0.95)
    out = []
    for i, value in enumerate(point):
        lo, hi = _interval([s[i] for s in samples], level)
        out.append({"predicted_loss": value, "lo": lo, "hi": hi,
                    "at_proxy_tokens": not law.in_tokens})
    return out


# -- the fit file (written by `grow predict`, read by `grow plan` and `grow run`) ----------

def read_fit(path: str | Path, key: str = "plan.loss_fit") -> dict:
    """The fit in a fit file (with its bootstrap laws and verdict), or ConfigError naming `key`
    in one line."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
        law = law_of(data)
        bootstrap_laws(data)
        lawful = bool(data["lawful"])
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file (write one with grow predict)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(key, f"{path}: not a loss fit with intervals written by grow predict "
                               f"({type(e).__name__}: {e}); run grow predict again") from None
    if data.get("n") != N_MEANING or not all(math.isfinite(v) for v in (law.E, law.A, law.alpha, law.B, law.beta)):
        raise ConfigError(key, f"{path}: not a loss fit of {N_MEANING} written by grow predict")
    data["lawful"] = lawful
    return data


def stage_sizes(schedule) -> list[tuple[int, int]]:
    """(N, tokens) of each stage of a resolved schedule."""
    return [(non_embedding_parameters(s.spec), s.tokens) for s in schedule]


def predicted_vs_actual(fit_path: str, stages: list[tuple[float, float]], actual: float | None) -> dict:
    """A finished run's final validation loss against the fit's prediction for its schedule
    ((N, tokens) of each stage), with the prediction's interval; no prediction from a fit
    that is not a law."""
    fit = read_fit(fit_path)
    out = {"fit": str(fit_path), "n": stages[-1][0], "tokens": sum(d for _, d in stages),
           "actual_final_val_loss": actual, "lawful": fit["lawful"]}
    if not fit["lawful"]:
        out["not_a_law"] = fit["verdict"]
        return out
    final = schedule_prediction(fit, stages)[-1]
    out.update({"predicted_final_val_loss": final["predicted_loss"], "predicted_lo": final["lo"],
                "predicted_hi": final["hi"]})
    if actual is not None:
        out["rel_error"] = relative_error(final["predicted_loss"], actual)
        out["within_interval"] = final["lo"] <= actual <= final["hi"]
    return out


def plot_fit(fit: dict, out: Path, extra: list[dict] = (), title: str = "") -> Path:
    """Loss against N: the proxies (one colour per token count), the law at each token count
    with its 95% band (bootstrap laws), and `extra` points ({"n", "tokens", "loss", "label",
    "predicted"?, "lo"?, "hi"?}: models the fit never saw, with their predictions)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    law, laws = law_of(fit), bootstrap_laws(fit)
    level = fit.get("level", 0.95)
    ns = [p["n"] for p in fit["points"]] + [p["n"] for p in extra]
    grid = np.geomspace(min(ns) / 1.3, max(ns) * 1.3, 120)
    counts = sorted({p["tokens"] for p in fit["points"]} | ({p["tokens"] for p in extra} if law.in_tokens else set()))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(counts)))
    fig, ax = plt.subplots(figsize=(8, 5))
    for d, colour in zip(counts, colours):
        band = [_interval([lw(n, d) for lw in laws], level) for n in grid]
        ax.fill_between(grid, [b[0] for b in band], [b[1] for b in band], color=colour, alpha=0.2, lw=0)
        ax.plot(grid, [law(n, d) for n in grid], "-", color=colour, lw=1, label=f"law at {d:,} tokens")
        pts = [p for p in fit["points"] if p["tokens"] == d]
        if pts:
            ax.plot([p["n"] for p in pts], [p["loss"] for p in pts], "o", color=colour, ms=5)
    for p in extra:
        colour = colours[counts.index(p["tokens"])] if p["tokens"] in counts else "black"
        ax.plot([p["n"]], [p["loss"]], "*", ms=13, color=colour, markeredgecolor="black",
                label=p.get("label", "measured"))
        if "predicted" in p:
            bar = [[p["predicted"] - p["lo"]], [p["hi"] - p["predicted"]]]
            ax.errorbar([p["n"] * 1.04], [p["predicted"]], yerr=bar, fmt="_", color="red", capsize=3, ms=10)
    ax.set_xscale("log")
    ax.set_xlabel(f"N ({N_MEANING})")
    ax.set_ylabel("final validation loss (nats/token)")
    verdict = "a law" if fit.get("lawful") else "NOT a law"
    ax.set_title(title or f"{fit['law']} ({verdict}); bands: {100 * level:.0f}% bootstrap", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
