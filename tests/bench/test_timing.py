"""bench/common.py's interleaved timing and its refusals: pure functions, in-process."""
from __future__ import annotations

import itertools
import json
import math

import pytest

from bench import common


def test_ratio_summary_is_the_mean_paired_ratio_and_twice_its_standard_error():
    s = common.ratio_summary([1.0, 1.2, 1.1, 1.3])
    assert s["pairs"] == 4 and s["ratio"] == pytest.approx(1.15) and s["effect"] == pytest.approx(0.15)
    assert s["std"] == pytest.approx(0.129099, rel=1e-5) and s["spread"] == pytest.approx(0.129099, rel=1e-5)
    assert common.ratio_summary([1.1])["spread"] == math.inf  # one pair says nothing about the spread


def test_settled_needs_min_pairs_and_a_small_spread():
    steady = [1.05] * 3
    assert not common.settled(steady, 0.01, min_pairs=4)
    assert common.settled(steady + [1.05], 0.01, min_pairs=4)
    assert not common.settled([1.0, 1.2, 0.9, 1.3], 0.01, min_pairs=4)


def quiet(n):
    return [0.3] * n


def test_a_spread_wider_than_the_effect_and_the_resolution_is_refused():
    # the old tracking_overhead.json: on/off ratios of blocks that ran at different loads
    noisy = common.ratio_summary([0.25, 0.45, 1.02, 1.15, 1.45, 0.31, 0.42, 0.49, 1.9, 0.3])
    why = common.refusal(noisy, 0.01, quiet(10), own_threads=0, max_load=1.5)
    assert why.startswith("spread ") and "larger than the effect" in why
    # a clear effect with a spread below it is published, whatever the resolution
    clear = common.ratio_summary([1.20, 1.22, 1.19, 1.21])
    assert common.refusal(clear, 0.001, quiet(4), own_threads=0, max_load=1.5) is None
    # no effect, and a spread within the resolution the bench claims: "below resolution", published
    flat = common.ratio_summary([1.002, 0.998, 1.004, 0.996, 1.0, 1.0])
    assert common.refusal(flat, 0.01, quiet(6), own_threads=0, max_load=1.5) is None
    assert common.refusal(flat, 0.001, quiet(6), own_threads=0, max_load=1.5) is not None


def test_a_busy_machine_is_refused_beyond_the_bench_s_own_threads():
    clear = common.ratio_summary([1.20, 1.22, 1.19, 1.21])
    assert common.refusal(clear, 0.01, [3.4, 3.6], own_threads=2, max_load=1.5) is None  # 1.5 from the others
    why = common.refusal(clear, 0.01, [3.6, 3.8], own_threads=2, max_load=1.5)
    assert why.startswith("machine busy: load average 3.70")
    assert common.busy_limit(2) == 1.5


def test_interleaved_alternates_the_order_and_stops_once_settled():
    calls, load = [], itertools.count(1)

    def side(name, base):
        def block():
            calls.append(name)
            return base * next(load)  # a machine that slows down steadily: the paired ratios tend to 1
        return block

    t = common.interleaved({"a": side("a", 1.0), "b": side("b", 1.0)}, target_spread=0.2, min_pairs=4, max_pairs=40)
    assert calls[:8] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert t["pairs"] == len(t["ratios"]) == len(t["loadavg_1_per_pair"]) >= 4
    assert t["spread"] <= 0.2 and len(t["blocks_s"]["a"]) == t["pairs"]
    noisy = itertools.cycle([1.0, 2.0, 1.0, 0.5])
    t = common.interleaved({"a": lambda: 1.0, "b": lambda: next(noisy)}, target_spread=0.001, min_pairs=2,
                           max_pairs=7)
    assert t["pairs"] == 7  # never settles: stops at max_pairs


def test_publish_timing_writes_only_what_is_not_refused(tmp_path, capsys):
    good = {**common.ratio_summary([1.2, 1.21, 1.19]), "loadavg_1_per_pair": [0.2] * 3, "max_load": 1.5}
    bad = {**common.ratio_summary([0.5, 1.5, 1.0]), "loadavg_1_per_pair": [0.2] * 3, "max_load": 1.5}
    assert common.publish_timing("x.json", {"v": 1}, [good, bad], 0.01, 0, tmp_path) == 1
    assert not (tmp_path / "x.json").exists()
    assert capsys.readouterr().err.startswith("bench: refused to write x.json: spread ")
    assert common.publish_timing("x.json", {"v": 1}, [good], 0.01, 0, tmp_path) == 0
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 1}


def test_check_quiet_refuses_a_busy_start(monkeypatch):
    monkeypatch.setattr(common.os, "getloadavg", lambda: (4.0, 3.0, 2.0))
    with pytest.raises(SystemExit, match=r"machine busy before starting \(load average 4.00 > 1.50\)"):
        common.check_quiet(1.5)
    assert common.check_quiet(5.0) == 4.0
