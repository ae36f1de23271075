"""bench/upcycle.py's arms and figures, in-process: the schedules it runs are valid configs
with the mixture where it belongs, the dense arm's stage 2 costs the mixture's FLOPs, and the
curves after the switch and the FLOPs to the dense target are computed as documented."""
from __future__ import annotations

import pytest

from bench import upcycle as bu
from orchestrator.commands.plan import compose_config


@pytest.fixture(scope="module")
def args():
    a = bu.parse([])
    a.scratch_steps = 47
    return a


def test_each_arm_is_a_valid_schedule_with_the_mixture_where_it_belongs(args):
    stages = {}
    for arm in bu.ARMS:
        cfg = compose_config(bu.overrides(args, arm, 1e-3, 2, dense_steps=41))
        assert cfg.seed == 2 and cfg.tracking.enabled is False
        stages[arm] = cfg.schedule.stages
    assert [s.moe is None for s in stages["dense"]] == [True, True]
    assert stages["dense"][1].tokens == 41 * args.batch * args.seq and stages["dense"][1].growth is None
    for arm in ("upcycle", "drop_upcycle"):
        pre, post = stages[arm]
        assert pre.moe is None and pre.lr.peak == args.pre_lr and pre.lr.decay == "constant"
        assert (post.moe.experts, post.moe.top_k, post.growth.operator) == (args.experts, args.top_k, arm)
        assert post.lr.peak == 1e-3 and post.tokens == args.post_steps * args.batch * args.seq
    assert stages["drop_upcycle"][1].growth.drop_ratio == args.drop_ratio
    (only,) = stages["scratch"]
    assert only.moe.experts == args.experts and only.tokens == 47 * args.batch * args.seq


def test_the_dense_arm_costs_the_mixture_s_stage_2_flops_and_scratch_the_whole_run(args):
    from growth_ops.spec import flops_per_token
    dense_steps, scratch_steps = bu.equal_flops_steps(args)
    dense, moe = bu.specs(args)
    assert (dense.experts, moe.experts, moe.top_k) == (0, args.experts, args.top_k)
    step = args.batch * args.seq
    per_dense, per_moe = flops_per_token(dense, args.seq) * step, flops_per_token(moe, args.seq) * step
    assert per_moe > per_dense  # top_k experts and the router: a mixture's token costs more
    assert abs(dense_steps * per_dense - args.post_steps * per_moe) <= per_dense / 2
    assert abs(scratch_steps * per_moe - (args.pre_steps * per_dense + args.post_steps * per_moe)) <= per_moe / 2


def c(flops, losses, growth=()):
    return {"flops": list(flops), "wall_s": [0.0] * len(flops), "val_loss": list(losses), "growth_flops": list(growth)}


def test_after_switch_counts_flops_from_the_switch_and_keeps_the_switch_point():
    cur = bu.after_switch(c([10, 20, 30, 40], [4.0, 3.0, 2.5, 2.0], growth=[20]))
    assert (cur["flops"], cur["val_loss"], cur["switch_flops"]) == ([0, 10, 20], [3.0, 2.5, 2.0], 20)
    scratch = c([5, 10], [4.0, 3.0])
    assert bu.after_switch(scratch) is scratch


def test_compare_measures_flops_to_the_dense_final_loss_against_dense_s_own():
    curves = {"dense": {**c([0, 10, 20], [3.0, 2.6, 2.4]), "switch_flops": 50},
              "upcycle": c([0, 10, 20], [3.0, 2.2, 2.0]),  # reaches 2.4 halfway to its first eval
              "drop_upcycle": c([0, 10, 20], [3.4, 2.8, 2.5]),  # never
              "scratch": c([20, 40, 60, 80], [3.5, 2.8, 2.4, 2.2])}
    r = bu.compare(curves, dense_total=70.0)
    assert r["target_val_loss"] == 2.4
    assert r["dense"]["flops_frac"] == 1.0
    assert r["upcycle"]["flops_to_target"] == pytest.approx(10 * 0.6 / 0.8)
    assert r["upcycle"]["flops_frac"] == pytest.approx(7.5 / 20)
    assert r["drop_upcycle"]["flops_frac"] is None and r["drop_upcycle"]["final_val_loss"] == 2.5
    assert r["scratch"]["flops_frac"] == pytest.approx(60 / 70)
    assert r["scratch"]["val_loss_at_stage2_flops"] == 3.5  # at 20 FLOPs: its first evaluation


def test_loss_at_interpolates_and_is_none_outside_the_evaluations():
    cur = c([10, 20, 30], [3.0, 2.0, 1.5])
    assert bu.loss_at(cur, 15) == pytest.approx(2.5)
    assert bu.loss_at(cur, 5) is None
    assert bu.loss_at(cur, 35) is None and bu.loss_at(cur, 30) == 1.5 and bu.loss_at(cur, 10) == 3.0


def test_moe_literal_adds_the_mixture_to_one_stage():
    s = bu.moe_literal("{name:x,shape:{layers:1},tokens:8,batch_size:1}", 8, 2, 0.01)
    assert s == "{name:x,shape:{layers:1},moe:{experts:8,top_k:2,aux_loss_coef:0.01},tokens:8,batch_size:1}"
