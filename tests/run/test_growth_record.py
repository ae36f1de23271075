"""The growth record's JSON is a contract: checkpoints' meta.json and summary.json keep the
keys and order every release wrote, and records of earlier releases read back unchanged."""
from __future__ import annotations

import json

from orchestrator.run.growth_record import GrowthRecord, PositionSwitch

GROWTH = {"operator": "msg", "val_loss_before": 5.25, "val_loss_after": 5.2500001, "preserves_function": True,
          "check_dtype": "fp32", "started_at": 1700000000.25, "seconds": 0.412}
SWITCH = {"from": {"rope_theta": 10000.0, "rope_interpolation": 1.0},
          "to": {"rope_theta": 10000.0, "rope_interpolation": 2.0}, "val_loss_before": 5.1, "val_loss_after": 5.4}


def _same_json(a: dict, b: dict) -> bool:
    return json.dumps(a) == json.dumps(b)  # keys, order and values


def test_growth_switch_and_both_write_the_keys_they_always_did():
    growth = GrowthRecord.from_dict(GROWTH)
    assert _same_json(growth.to_dict(), GROWTH)
    assert growth.grew and growth.checked and abs(growth.delta - 1e-7) < 1e-12
    both = growth.with_switch(PositionSwitch.from_dict(SWITCH))
    assert _same_json(both.to_dict(), {**GROWTH, "val_loss_after": 5.4, "positions": SWITCH,
                                       "val_loss_after_growth": 5.2500001})
    switch_only = {"operator": None, "val_loss_before": 5.1, "val_loss_after": 5.4, "preserves_function": False,
                   "check_dtype": "bf16", "positions": SWITCH}
    record = GrowthRecord.from_dict(switch_only)
    assert _same_json(record.to_dict(), switch_only) and not record.grew and not record.checked


def test_records_of_earlier_releases_and_unknown_keys_read_back_unchanged():
    first_release = {"operator": "stack", "val_loss_before": 5.0, "val_loss_after": 5.9, "preserves_function": False}
    assert _same_json(GrowthRecord.from_dict(first_release).to_dict(), first_release)
    later = {**GROWTH, "from_a_newer_release": [1, 2]}
    assert GrowthRecord.from_dict(later).to_dict() == later
    assert GrowthRecord.from_dict(None) is None
