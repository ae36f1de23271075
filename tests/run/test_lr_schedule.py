from __future__ import annotations

import json
import math

import pytest

from orchestrator.budget.ledger import Ledger
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import LRConfig, StageConfig
from orchestrator.schedule.checks import check_wsd_window as _check_wsd_window
from orchestrator.run.lr import lr_at
from orchestrator.schedule import wsd_decay_steps

from ..conftest import fork_grow


def test_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 100, 1e-3, 10, 1e-4, "cosine") for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay
    assert lrs[54] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_linear_and_constant():
    assert lr_at(99, 100, 1.0, 0, 0.0, "linear") == pytest.approx(0.0)
    assert lr_at(50, 100, 1.0, 0, 0.5, "constant") == 1.0


def test_wsd_holds_then_decays_linearly_over_its_window_only():
    lrs = [lr_at(s, 20, 1.0, 4, 0.1, "wsd", decay_steps=5) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:15] == [1.0] * 11  # stable until the last 5 updates
    assert lrs[15:] == pytest.approx([1.0 - 0.9 * k / 5 for k in range(1, 6)])  # ends on the floor
    # no window (an earlier stage of the schedule): stable to the end
    assert [lr_at(s, 20, 1.0, 4, 0.1, "wsd") for s in range(4, 20)] == [1.0] * 16


def _stage(tokens: int, batch: int, seq: int, decay: str = "wsd", fraction: float = 0.2) -> StageConfig:
    return StageConfig(name="s", tokens=tokens, batch_size=batch, seq_len=seq,
                       lr=LRConfig(peak=1e-3, decay=decay, decay_fraction=fraction))


def test_wsd_window_is_a_fraction_of_the_whole_schedule_in_the_last_stage_alone():
    # 100 + 100 steps of 1024 tokens, then 50 steps of 2048: 307,200 tokens
    stages = [_stage(102400, 8, 128), _stage(102400, 8, 128), _stage(102400, 8, 256, fraction=0.1)]
    assert [wsd_decay_steps(stages, i) for i in range(3)] == [0, 0, 15]  # 0.1 x 307,200 / 2048
    stages[2].lr.decay = "cosine"
    assert wsd_decay_steps(stages, 2) == 0
    assert wsd_decay_steps([_stage(1024, 8, 128, fraction=0.01)], 0) == 1  # at least one step


def test_wsd_window_is_checked_only_under_wsd():
    # a last stage shorter than its re-warm is allowed by cosine (it never reaches its peak)
    short = _stage(1024, 8, 64, decay="cosine")  # 2 steps, warmup 4
    short.lr.warmup_steps = 4
    _check_wsd_window([_stage(102400, 8, 128), short])
    short.lr.decay = "wsd"
    with pytest.raises(ConfigError, match="decay_fraction"):
        _check_wsd_window([_stage(102400, 8, 128), short])


def test_wsd_across_growths_and_a_resume(tmp_path, data_cache):
    """A real 3-stage run with wsd everywhere, stopped by a token cap inside the last stage's
    decay window and resumed: every logged LR is the schedule's, before and after the resume."""
    run_dir = tmp_path / "run"
    wsd = [f"schedule.stages.{i}.lr.decay=wsd" for i in range(3)]
    common = (f"hydra.run.dir={run_dir}", "tracking=off", "train.log_every_steps=1",
              "schedule.stages.2.lr.decay_fraction=0.15", *wsd)
    # tiny: s1, s2 32 steps of 512 tokens (warmup 4), s3 16 steps of 1024 (warmup 2), 49,152 in all;
    # the window: round(0.15 x 49,152 / 1024) = 7 updates, s3's updates 10..16 (1-based, as logged)
    fork_grow(tmp_path, *common, "budget.max_tokens=45056", cache=data_cache)  # stops after s3's step 12
    first = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in first if "train/lr" in r) == 64 + 12  # steps count over the run
    fork_grow(tmp_path, *common, "budget.max_tokens=49152", cache=data_cache)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = {"s1": 0, "s2": 32, "s3": 64}
    lr = {(r["stage"], r["step"] - start[r["stage"]]): r["train/lr"] for r in recs if "train/lr" in r}
    want = {**{("s1", k + 1): lr_at(k, 32, 3e-3, 4, 1e-3, "wsd") for k in range(32)},
            **{("s2", k + 1): lr_at(k, 32, 3e-3, 4, 5e-4, "wsd") for k in range(32)},  # inherits 3e-3
            **{("s3", k + 1): lr_at(k, 16, 3e-3, 2, 1e-4, "wsd", 7) for k in range(16)}}
    assert lr == pytest.approx(want, rel=1e-9)
    assert lr[("s2", 32)] == 3e-3 and lr[("s3", 9)] == 3e-3 and lr[("s3", 16)] == pytest.approx(1e-4)
    assert lr[("s3", 13)] == pytest.approx(3e-3 - 2.9e-3 * 4 / 7)  # after the resume: the 4th decay step


def test_ledger_round_trip_and_totals():
    led = Ledger()
    led.stage("a").add(100, 1e9, 3600.0, 2, 1.5)
    led.stage("b").add(50, 5e8, 1800.0, 1, 1.5)
    again = Ledger.from_dict(led.to_dict())
    t = again.total
    assert (t.tokens, t.steps, t.flops) == (150, 2, 1.5e9)
    assert t.gpu_hours == pytest.approx(2.5) and t.cost_usd == pytest.approx(3.75)
