from __future__ import annotations

import math

import pytest

from orchestrator.budget.ledger import Ledger
from orchestrator.run.lr import lr_at


def test_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 100, 1e-3, 10, 1e-4, "cosine") for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay
    assert lrs[54] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_linear_and_constant():
    assert lr_at(99, 100, 1.0, 0, 0.0, "linear") == pytest.approx(0.0)
    assert lr_at(50, 100, 1.0, 0, 0.5, "constant") == 1.0


def test_ledger_round_trip_and_totals():
    led = Ledger()
    led.stage("a").add(100, 1e9, 3600.0, 2, 1.5)
    led.stage("b").add(50, 5e8, 1800.0, 1, 1.5)
    again = Ledger.from_dict(led.to_dict())
    t = again.total
    assert (t.tokens, t.steps, t.flops) == (150, 2, 1.5e9)
    assert t.gpu_hours == pytest.approx(2.5) and t.cost_usd == pytest.approx(3.75)
