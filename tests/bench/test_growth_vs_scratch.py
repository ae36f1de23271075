"""bench/growth_vs_scratch.py's measurement and its LR sweep: pure functions, in-process."""
from __future__ import annotations

import pytest

from bench import growth_vs_scratch as gvs


def curve(losses, flops_per_eval=10.0):
    n = len(losses)
    return {"flops": [flops_per_eval * (i + 1) for i in range(n)], "wall_s": [2.0 * (i + 1) for i in range(n)],
            "val_loss": list(losses), "growth_flops": [], "total_flops": flops_per_eval * n}


def test_crossing_interpolates_between_evaluations_and_is_none_when_never_reached():
    c = curve([3.0, 2.0, 1.0])
    assert gvs.crossing(c, 1.5) == pytest.approx((25.0, 5.0))
    assert gvs.crossing(c, 3.5) == (10.0, 2.0)  # already below at the first evaluation
    assert gvs.crossing(c, 0.5) == (None, None)


def test_fractions_are_against_the_scratch_run_s_final_loss_and_length():
    scratch = curve([3.0, 2.5, 2.0, 1.5])  # ends at 1.5 after 40 FLOPs, 8 s
    fr = gvs.fractions(curve([2.0, 1.5, 1.2]), scratch)
    assert fr["flops_frac"] == pytest.approx(20.0 / 40.0)
    assert fr["wall_frac"] == pytest.approx(4.0 / 8.0)
    assert fr["final_val_loss"] == 1.2
    assert gvs.fractions(curve([2.0, 1.6]), scratch)["flops_frac"] is None


@pytest.mark.parametrize("tried, best, expected", [
    ([1.0, 2.0, 4.0], 2.0, None),           # bracketed: nothing to add
    ([1.0, 2.0, 4.0], 1.0, 0.5),            # best on the low edge: halve
    ([1.0, 2.0, 4.0], 4.0, 8.0),            # best on the high edge: double
    ([0.25, 0.5, 1.0, 2.0, 4.0], 0.25, None),  # two halvings beyond the base grid: the limit
    ([1.0, 2.0, 4.0, 8.0, 16.0], 16.0, None),
])
def test_the_sweep_widens_only_while_the_best_lr_sits_on_its_edge(tried, best, expected):
    assert gvs.next_lr(tried, best, base=[1.0, 2.0, 4.0], limit=2) == expected


def test_operators_are_chosen_against_the_chosen_scratch_run():
    runs = {("scratch", 1.0, 30, 0): curve([3.0, 2.0, 1.6]), ("scratch", 2.0, 30, 0): curve([3.0, 2.0, 1.5]),
            ("msg", 1.0, 30, 0): curve([2.0, 1.5, 1.4], 5.0),   # reaches 1.5 at 10 of 30 FLOPs
            ("msg", 2.0, 30, 0): curve([2.0, 1.7, 1.3], 5.0)}   # later (12.5), though it ends lower
    chosen, sweeps = gvs.choose(runs, ["scratch", "msg"])
    assert chosen == {"scratch": (2.0, 30), "msg": (1.0, 30)}
    assert [r["flops_frac"] for r in sweeps["msg"]] == pytest.approx([10 / 30, 12.5 / 30])


def test_budget_frac_interpolates_the_final_losses_of_schedules_of_several_lengths():
    rows = [{"total_flops_frac": 0.5, "final_val_loss": 1.8}, {"total_flops_frac": 0.7, "final_val_loss": 1.6},
            {"total_flops_frac": 0.6, "final_val_loss": 1.7}]
    assert gvs.budget_frac(rows, 1.65) == pytest.approx(0.65)
    assert gvs.budget_frac(rows, 1.9) == 0.5       # the shortest already ends below the target
    assert gvs.budget_frac(rows, 1.5) is None      # the longest still ends above it
