"""The loss of a model from its size: L(N) = a * N^b + c, fitted to proxies of several
widths trained on the same tokens (FLM-101B's loss prediction).

N is the number of non-embedding parameters (blocks and final norm; no embedding, no
untied head): at proxy widths with a 256-entry byte vocabulary the embeddings are a large,
width-linear share of the count that does not buy loss the way block parameters do
(Kaplan et al. 2020 fit non-embedding parameters for the same reason). The fit holds at
the proxies' token count: a prediction is the loss a model of N parameters reaches on
those tokens.

No torch here: `grow plan` reads a fit without loading it. scipy and matplotlib are
imported where they are used.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from growth_ops.spec import VOCAB, ModelSpec, axis_size, parameter_axes

from orchestrator.config.errors import ConfigError

LAW = "L(N) = a * N^b + c"
N_MEANING = "non-embedding parameters"
MIN_POINTS = 3  # three coefficients


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
class PowerLaw:
    a: float
    b: float
    c: float

    def __call__(self, n: float) -> float:
        return self.a * n ** self.b + self.c


def fit_power_law(ns: list[float], losses: list[float]) -> PowerLaw:
    """Least squares of L(N) = a * N^b + c. Fitted in N / max(N), so a stays of the order of
    the losses whatever the model sizes (the solver starts from a=1-ish, b=-0.5)."""
    if len(ns) != len(losses) or len(set(ns)) < MIN_POINTS:
        raise FitError(f"{len(set(ns))} model sizes given; {LAW} needs at least {MIN_POINTS}")
    if not all(math.isfinite(x) for x in losses):
        raise FitError(f"a loss is not finite: {losses}")
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    x, y = np.asarray(ns, dtype=float), np.asarray(losses, dtype=float)
    scale = x.max()
    spread = max(y.max() - y.min(), 1e-3)
    try:
        with warnings.catch_warnings():  # 3 points fit exactly: no covariance, which we do not use
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b, c), _ = curve_fit(lambda n, a, b, c: a * n ** b + c, x / scale, y,
                                     p0=(spread, -0.5, max(y.min() - spread, 0.0)),
                                     bounds=((0.0, -5.0, 0.0), (np.inf, 0.0, np.inf)), maxfev=20000)
    except (RuntimeError, ValueError) as e:
        raise FitError(f"{LAW} did not converge on these points: {e}") from None
    return PowerLaw(a=float(a) * scale ** -float(b), b=float(b), c=float(c))


def relative_error(predicted: float, actual: float) -> float:
    return abs(predicted - actual) / actual


def fit_with_held_out(points: list[dict]) -> dict:
    """`points`: {"n", "loss", ...} per proxy. The law fitted to all points (the one used
    to predict), and, with 4 or more, the largest proxy held out: the law fitted to the
    others and its relative error on the largest."""
    points = sorted(points, key=lambda p: p["n"])
    law = fit_power_law([p["n"] for p in points], [p["loss"] for p in points])
    held_out = None
    if len({p["n"] for p in points}) > MIN_POINTS:
        rest, largest = points[:-1], points[-1]
        partial = fit_power_law([p["n"] for p in rest], [p["loss"] for p in rest])
        predicted = partial(largest["n"])
        held_out = {**largest, "predicted": predicted, "rel_error": relative_error(predicted, largest["loss"]),
                    "fit_without_it": asdict(partial)}
    return {"law": LAW, "n": N_MEANING, **asdict(law), "points": points, "held_out": held_out}


# -- the fit file (written by `grow predict`, read by `grow plan` and `grow run`) ----------

def read_fit(path: str | Path, key: str = "plan.loss_fit") -> PowerLaw:
    """The law in a fit file, or ConfigError naming `key` in one line."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
        law = PowerLaw(float(data["a"]), float(data["b"]), float(data["c"]))
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file (write one with grow predict)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(key, f"{path}: not a loss fit written by grow predict ({type(e).__name__}: {e})") from None
    if data.get("n") != N_MEANING or not all(math.isfinite(v) for v in (law.a, law.b, law.c)):
        raise ConfigError(key, f"{path}: not a loss fit of {N_MEANING} written by grow predict")
    return law


def predict(law: PowerLaw, spec: ModelSpec) -> float:
    return law(non_embedding_parameters(spec))


def predicted_vs_actual(fit_path: str, spec: ModelSpec, actual: float | None) -> dict:
    """A finished run's final validation loss against the fit's prediction for its final shape."""
    predicted = predict(read_fit(fit_path), spec)
    out = {"fit": str(fit_path), "n": non_embedding_parameters(spec), "predicted_final_val_loss": predicted,
           "actual_final_val_loss": actual}
    if actual is not None:
        out["rel_error"] = relative_error(predicted, actual)
    return out


def plot_fit(fit: dict, out: Path, extra: list[dict] = (), title: str = "") -> Path:
    """Proxies, the held-out largest (fitted without it), the law, and `extra` points
    ({"n", "loss", "label"}: models the fit predicts, e.g. a wider model's measured loss)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    law = PowerLaw(fit["a"], fit["b"], fit["c"])
    ns = [p["n"] for p in fit["points"]] + [p["n"] for p in extra]
    grid = np.geomspace(min(ns) / 1.3, max(ns) * 1.3, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, [law(n) for n in grid], "-", color="tab:blue",
            label=f"fit, all proxies: {law.a:.3g} N^{law.b:.3f} + {law.c:.3f}")
    held = fit.get("held_out")
    fitted = [p for p in fit["points"] if not held or p["n"] != held["n"]]
    ax.plot([p["n"] for p in fitted], [p["loss"] for p in fitted], "o", color="tab:blue", label="proxies")
    if held:
        partial = PowerLaw(**held["fit_without_it"])
        ax.plot(grid, [partial(n) for n in grid], "--", color="tab:orange", lw=1, label="fit without the largest")
        ax.plot([held["n"]], [held["loss"]], "s", color="tab:orange", ms=8,
                label=f"held out (error {100 * held['rel_error']:.2f}%)")
    for p in extra:
        ax.plot([p["n"]], [p["loss"]], "*", ms=12, label=p.get("label", "measured"))
    ax.set_xscale("log")
    ax.set_xlabel(f"N ({N_MEANING})")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title or f"{LAW} at {fit.get('tokens', '?')} tokens")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
