"""The loss law L(N, D) = E + A/N^alpha + B/D^beta (orchestrator/budget/law_fit.py, loss_law.py,
grown.py): known parameters recovered from synthetic grids with intervals that cover them,
the fixed-token special case, fits that are not laws (a parameter at its bound, an interval
too wide), a grown schedule's carry-over arithmetic, and `grow plan`'s predicted-loss column
with its interval (none from a fit that is not a law). In-process, no training."""
from __future__ import annotations

import json
import random

import pytest

from orchestrator.budget.grown import carried_tokens, grown_losses
from orchestrator.budget.law_fit import fit_report
from orchestrator.budget.loss_law import FitError, Law, law_of, read_fit, schedule_prediction

from ..conftest import grow_in_process

NS = [8272, 18552, 32928, 73968]  # the bench's proxies: widths 16, 24, 32, 48 (2 layers)
DS = [131072, 262144, 524288]
TRUTH = Law(E=1.2, A=40.0, alpha=0.3, B=90.0, beta=0.35)


def grid(law: Law, noise: float = 0.0, seeds: int = 3, ns=NS, ds=DS) -> list[dict]:
    """Every (N, D) at `seeds` seeds, each loss off the law by a deterministic relative noise."""
    rng = random.Random(1)
    return [{"n": n, "tokens": d, "width": i, "seed": s, "loss": law(n, d) * (1 + rng.gauss(0, noise))}
            for i, n in enumerate(ns) for d in ds for s in range(seeds)]


@pytest.fixture(scope="module")
def noisy_fit():
    return fit_report(grid(TRUTH, noise=0.002), samples=100)


def test_exact_points_recover_the_parameters():
    fit = fit_report(grid(TRUTH, seeds=1), samples=20)
    law = law_of(fit)
    for k in ("E", "A", "alpha", "B", "beta"):
        assert getattr(law, k) == pytest.approx(getattr(TRUTH, k), rel=1e-3), k
    assert fit["law"].startswith("L(N, D)") and fit["tokens"] is None


def test_noisy_points_give_intervals_that_cover_the_parameters(noisy_fit):
    fit = noisy_fit
    n0, d0 = fit["reference"]["N0"], fit["reference"]["D0"]
    truth = {"E": TRUTH.E, "a": TRUTH.A * n0 ** -TRUTH.alpha, "alpha": TRUTH.alpha,
             "b": TRUTH.B * d0 ** -TRUTH.beta, "beta": TRUTH.beta}
    for k, p in fit["parameters"].items():
        assert p["lo"] <= truth[k] <= p["hi"], (k, p, truth[k])
        assert p["lo"] < p["value"] < p["hi"]
    assert fit["lawful"], fit["verdict"]
    assert len(fit["bootstrap"]["laws"]) + fit["bootstrap"]["failed"] == 100
    assert [len(p["seed_losses"]) for p in fit["points"]] == [3] * 12  # seeds averaged per grid point


def test_a_prediction_carries_an_interval_that_covers_the_truth(noisy_fit):
    n, d = 4 * NS[-1], 4 * DS[-1]  # far from the proxies: 4x the widest, 4x the longest
    p = schedule_prediction(noisy_fit, [(n, d)])[0]
    assert p["lo"] < p["predicted_loss"] < p["hi"] and p["lo"] <= TRUTH(n, d) <= p["hi"]
    assert p["predicted_loss"] == pytest.approx(TRUTH(n, d), rel=0.01)


def test_held_out_checks_are_fitted_without_what_they_check():
    points = grid(TRUTH, seeds=1, ds=DS + [2 * DS[-1]])
    widest = max(points, key=lambda p: (p["n"], p["tokens"]))
    widest["loss"] *= 1.01  # 1% off the law: the fit without it predicts the law
    checks = {h["what"].split(" (")[0]: h for h in fit_report(points, samples=20)["held_out"]}
    assert set(checks) == {"the widest proxy", "the longest runs"}
    assert fit_report(grid(TRUTH, seeds=1), samples=20)["held_out"][0]["what"].startswith("the widest")  # 3 counts
    for h in checks.values():
        assert (h["n"], h["tokens"]) == (NS[-1], 2 * DS[-1])
        assert h["predicted"] == pytest.approx(TRUTH(NS[-1], 2 * DS[-1]), rel=1e-3)
        assert h["rel_error"] == pytest.approx(1 / 101, rel=0.02)


KAPLAN = Law(E=0.0, A=3000.0, alpha=0.7, B=5e5, beta=0.3, form="kaplan")


def test_the_kaplan_form_is_recovered_with_covering_intervals():
    fit = fit_report(grid(KAPLAN, noise=0.002), samples=60, form="kaplan")
    assert fit["law"] == "L(N, D) = (A/N^alpha + B/D)^beta" and set(fit["parameters"]) == {"a", "alpha", "b", "beta"}
    n0, d0 = fit["reference"]["N0"], fit["reference"]["D0"]
    truth = {"a": KAPLAN.A * n0 ** -KAPLAN.alpha, "alpha": KAPLAN.alpha, "b": KAPLAN.B / d0, "beta": KAPLAN.beta}
    for k, p in fit["parameters"].items():
        assert p["lo"] <= truth[k] <= p["hi"], (k, p, truth[k])
    assert fit["lawful"], fit["verdict"]
    exact = law_of(fit_report(grid(KAPLAN, seeds=1), samples=20, form="kaplan"))
    assert (exact.A, exact.alpha, exact.B, exact.beta) == pytest.approx((3000.0, 0.7, 5e5, 0.3), rel=1e-3)


def test_one_token_count_fits_the_fixed_token_law():
    truth = Law(E=2.0, A=80.0, alpha=0.3)
    fit = fit_report(grid(truth, ds=[524288], seeds=2, ns=[2e4, 5e4, 1.3e5, 4e5, 1e6]), samples=20)
    assert fit["law"].startswith("L(N) =") and fit["tokens"] == 524288 and set(fit["parameters"]) == {"E", "a", "alpha"}
    law = law_of(fit)
    assert (law.E, law.A, law.alpha) == pytest.approx((2.0, 80.0, 0.3), rel=1e-3)
    # a fixed-token law predicts at the proxies' tokens whatever a stage trains on
    p = schedule_prediction(fit, [(4e5, 10**9)])[0]
    assert p["at_proxy_tokens"] and p["predicted_loss"] == pytest.approx(truth(4e5), rel=1e-3)


def test_a_parameter_at_its_bound_is_not_a_law():
    # no irreducible loss (E = 0): the fit puts E on its lower bound
    fit = fit_report(grid(Law(E=0.0, A=40.0, alpha=0.3, B=90.0, beta=0.35), seeds=1), samples=20)
    assert not fit["lawful"] and "E at its lower bound" in fit["verdict"]
    assert fit["parameters"]["E"]["at_bound"] and "(predict.form=kaplan has none)" in fit["verdict"]


def test_an_interval_wider_than_the_limit_is_not_a_law():
    points = grid(TRUTH, noise=0.002)
    assert fit_report(points, samples=50)["lawful"]
    fit = fit_report(points, samples=50, max_interval=1e-4)
    assert not fit["lawful"] and "95% interval" in fit["verdict"] and "limit 0.0001" in fit["verdict"]


def test_too_few_points_cannot_be_fitted():
    with pytest.raises(FitError, match="2 model sizes"):
        fit_report(grid(TRUTH, ns=NS[:2]), samples=20)
    with pytest.raises(FitError, match="2 token counts; .* needs at least 3"):
        fit_report(grid(TRUTH, ds=DS[:2]), samples=20)
    sparse = [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2)]  # 3 sizes, 3 token counts, 5 points for 5 parameters
    with pytest.raises(FitError, match="5 points .* needs at least 6"):
        fit_report([{"n": NS[i], "tokens": DS[j], "loss": TRUTH(NS[i], DS[j])} for i, j in sparse], samples=20)


# -- a grown schedule ------------------------------------------------------------------

def test_carried_tokens_reach_the_smaller_models_loss():
    n1, d1, n2 = 7.4e4, 5.2e5, 3e5
    carried = carried_tokens(TRUTH, n1, d1, n2)
    assert 0 < carried < d1  # the larger model needs fewer tokens to reach the same loss
    assert TRUTH(n2, carried) == pytest.approx(TRUTH(n1, d1), rel=1e-12)
    assert carried_tokens(TRUTH, n1, d1, n1) == pytest.approx(d1)  # no growth: every token carries


def test_carried_tokens_of_the_kaplan_form_are_solved_for():
    n1, d1, n2 = 7.4e4, 5.2e5, 3e5
    carried = carried_tokens(KAPLAN, n1, d1, n2)
    assert 0 < carried < d1 and KAPLAN(n2, carried) == pytest.approx(KAPLAN(n1, d1), rel=1e-12)


def test_grown_losses_chain_the_stages_and_correct_the_last():
    stages = [(7.4e4, 524288), (3e5, 524288), (6e5, 1048576)]
    plain = grown_losses(TRUTH, stages)
    d_eff = 524288
    for (n_prev, _), (n, d), s in zip(stages, stages[1:], plain[1:]):
        assert s["carried_tokens"] == pytest.approx(carried_tokens(TRUTH, n_prev, d_eff, n))
        d_eff = s["carried_tokens"] + d
        assert s["effective_tokens"] == pytest.approx(d_eff) and s["loss"] == pytest.approx(TRUTH(n, d_eff))
    # a grown schedule ends above the same final model trained from scratch on all its tokens
    assert plain[-1]["loss"] > TRUTH(6e5, sum(d for _, d in stages))
    corrected = grown_losses(TRUTH, stages, correction=0.02)
    assert corrected[-1]["loss"] == pytest.approx(plain[-1]["loss"] * 1.02)
    assert [s["loss"] for s in corrected[:-1]] == [s["loss"] for s in plain[:-1]]  # only the final loss


# -- where it shows: grow plan ---------------------------------------------------------

def _write(tmp_path, fit: dict, name: str) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(fit))
    return str(path)


def test_plan_shows_each_stages_prediction_with_its_interval(tmp_path, capsys, noisy_fit):
    path = _write(tmp_path, noisy_fit, "law.json")
    assert grow_in_process("plan", "schedule=tiny", f"plan.loss_fit={path}", f"hydra.run.dir={tmp_path / 'p'}") == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert "pred. loss [95% interval]" in out
    for s in plan["stages"]:
        lo, hi = s["predicted_interval"]
        assert lo < s["predicted_loss"] < hi
        assert f"{s['predicted_loss']:.4f}" in out and f"[{lo:.4f}," in out  # the column wraps the interval
    assert plan["stages"][-1]["predicted_loss"] < plan["stages"][0]["predicted_loss"]


def test_plan_shows_no_prediction_from_a_fit_that_is_not_a_law(tmp_path, capsys):
    fit = fit_report(grid(Law(E=0.0, A=40.0, alpha=0.3, B=90.0, beta=0.35), seeds=1), samples=20)
    path = _write(tmp_path, fit, "flat.json")
    assert grow_in_process("plan", "schedule=tiny", f"plan.loss_fit={path}", f"hydra.run.dir={tmp_path / 'p'}") == 0
    out = capsys.readouterr().out
    assert "pred. loss" not in out and f"no predicted loss: {path} is not a law (E at its lower bound" in \
        out.replace("\n", "")
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert all(s["predicted_loss"] is None for s in plan["stages"])


def test_a_fit_without_intervals_is_refused(tmp_path):
    old = _write(tmp_path, {"law": "L(N) = a * N^b + c", "n": "non-embedding parameters", "a": 7.2, "b": -0.11,
                            "c": 0.0}, "old.json")
    with pytest.raises(Exception, match="not a loss fit with intervals"):
        read_fit(old)
