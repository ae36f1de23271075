"""Every growth operator on every architecture option: preserving operators keep the
logits (1e-5 relative, fp32) on random shapes and targets, grown models train, and the
optimizer moments follow each operator's rule exactly."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from growth_ops import GrowthError, ModelSpec, get_operator
from growth_ops.layer_placement import layer_name
from orchestrator.model import build_model

ARCHS = list(itertools.product(["rmsnorm", "layernorm"], ["swiglu", "gelu"], ["rope", "alibi"], [True, False]))
ARCH_IDS = [f"{n}-{m}-{p}-{'tied' if t else 'untied'}" for n, m, p, t in ARCHS]
PRESERVING = ["msg", "zero", "clone"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: threads only add contention on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def base_spec(draw, arch) -> ModelSpec:
    norm, mlp, position, tie = arch
    kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    return ModelSpec(layers=draw(st.integers(1, 2)), hidden=draw(st.sampled_from([8, 12, 16])),
                     ffn=draw(st.integers(4, 24)), heads=kv * group, kv_heads=kv,
                     head_dim=draw(st.sampled_from([4, 6])), vocab=29, norm=norm, mlp=mlp,
                     position=position, tie_embeddings=tie)


def insert_strategy(draw, old_layers: int, new_layers: int):
    how = draw(st.sampled_from(["append", "interleave", "positions"]))
    if how != "positions":
        return how
    spots = draw(st.permutations(range(new_layers)))[: new_layers - old_layers]
    return ",".join(map(str, sorted(spots)))


@st.composite
def growth_case(draw, op: str, arch):
    """(old spec, new spec, layer_insert, init, seed) reachable by `op`."""
    old = base_spec(draw, arch)
    g = old.group_size
    if op in ("msg", "zero"):
        kv = old.kv_heads + draw(st.integers(0, 2))
        new = old.with_shape(layers=old.layers + draw(st.integers(0, 2)),
                             hidden=old.hidden + draw(st.sampled_from([0, 4, 8, 20])),
                             ffn=old.ffn + draw(st.integers(0, 12)),
                             heads=kv * (g + draw(st.integers(0, 1))), kv_heads=kv)
    elif op == "clone":
        n_kv = draw(st.integers(1, 2))
        n_h = n_kv * draw(st.integers(1, 2))
        new = old.with_shape(layers=old.layers + draw(st.integers(0, 1)),
                             hidden=old.hidden * draw(st.integers(1, 3)), ffn=old.ffn * draw(st.integers(1, 3)),
                             heads=old.heads * n_h, kv_heads=old.kv_heads * n_kv)
    else:
        new = old.with_shape(layers=old.layers * draw(st.integers(1, 3)))
    if op == "stack":
        insert = draw(st.sampled_from(["append", "interleave"]))
    else:
        insert = insert_strategy(draw, old.layers, new.layers)
    init = draw(st.sampled_from(["random", "copy"])) if op == "msg" else None
    return old, new, insert, init, draw(st.integers(0, 10_000))


def grow_model(op_name, small, old, new, insert, init, seed, ramp=10, moments=None):
    op = get_operator(op_name)
    state, masks, plan = op.grow(small.canonical_state(), old, new, ramp_steps=ramp, layer_insert=insert,
                                 generator=torch.Generator().manual_seed(seed), init=init, moments=moments)
    big = build_model(new)
    big.load_canonical(state)
    big.set_masks(masks)
    return big, masks, plan


def assert_same_logits(small, big, vocab, seed):
    tokens = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before, after = small(tokens), big(tokens)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("op_name", PRESERVING)
def test_preserving_operator_keeps_logits(op_name, arch):
    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(growth_case(op_name, arch))
    def check(case):
        old, new, insert, init, seed = case
        assert get_operator(op_name).preserves_function
        small = build_model(old, seed=seed)
        big, masks, _ = grow_model(op_name, small, old, new, insert, init, seed + 1)
        assert (masks is not None) == (op_name == "msg")
        assert_same_logits(small, big, old.vocab, seed)

    check()


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_stack_repeats_blocks_and_does_not_claim_preservation(arch):
    @settings(max_examples=3, deadline=None)
    @given(growth_case("stack", arch))
    def check(case):
        old, new, insert, _, seed = case
        assert not get_operator("stack").preserves_function
        small = build_model(old, seed=seed)
        big, masks, plan = grow_model("stack", small, old, new, insert, None, seed)
        assert masks is None
        g = new.layers // old.layers
        expected = [j % old.layers if insert == "append" else j // g for j in range(new.layers)]
        assert plan.layer_src == expected
        s, b = small.canonical_state(), big.canonical_state()
        for name, t in b.items():
            i, rest = layer_name(name)
            src = name if i is None else f"layers.{expected[i]}.{rest}"
            assert torch.equal(t, s[src]), name

    check()


# -- training after growth -------------------------------------------------------------

TRAIN_CASES = {
    "msg": dict(layers=3, hidden=48, ffn=64, heads=6, kv_heads=2),
    "zero": dict(layers=3, hidden=48, ffn=64, heads=6, kv_heads=2),
    "clone": dict(layers=3, hidden=64, ffn=96, heads=8, kv_heads=4),
    "stack": dict(layers=4),
}


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("op_name", list(TRAIN_CASES))
def test_grown_model_trains_and_new_weights_move(op_name, norm):
    old = ModelSpec(layers=2, hidden=32, ffn=48, heads=4, kv_heads=2, head_dim=8, vocab=41, norm=norm,
                    tie_embeddings=op_name != "zero")
    new = old.with_shape(**TRAIN_CASES[op_name])
    torch.manual_seed(0)
    small = build_model(old, seed=0)
    big, masks, plan = grow_model(op_name, small, old, new, "interleave", None, 1, ramp=4)
    data = torch.randint(0, old.vocab, (8, 17), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(big.parameters(), lr=3e-3, weight_decay=0.0)
    start = {k: v.clone() for k, v in big.canonical_state().items()}
    grads = {k: torch.zeros_like(v) for k, v in big.named_parameters()}
    losses = []
    for _ in range(8):
        big.set_masks(masks)
        loss = big.loss(data)
        opt.zero_grad()
        loss.backward()
        for k, p in big.named_parameters():
            grads[k] += p.grad.abs()
        opt.step()
        if masks is not None:
            masks.advance()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    end = big.canonical_state()
    new_layer = next((j for j, i in enumerate(plan.layer_src) if i < 0), None) if op_name != "stack" else 3
    checks = []
    if new_layer is not None:  # whole new (or copied) block: every tensor gets gradients and moves
        checks += [(f"layers.{new_layer}.{n}", (slice(None),)) for n in ("attn.q.weight", "attn.o.weight",
                                                                          "mlp.up.weight", "mlp.down.weight")]
    if new.hidden > old.hidden:  # new residual coordinates (clone: the copies)
        checks += [("embed.weight", (slice(None), slice(old.hidden, None))),
                   ("layers.0.attn.q.weight", (slice(old.q_dim, None),)),
                   ("layers.0.mlp.up.weight", (slice(old.ffn, None),))]
    assert checks
    for name, idx in checks:
        assert grads[name][idx].abs().sum() > 0, f"{name}{idx} got no gradient"
        assert not torch.equal(end[name][idx], start[name][idx]), f"{name}{idx} did not move"


# -- optimizer state -------------------------------------------------------------------

def random_moments(spec: ModelSpec, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    state = build_model(spec).canonical_state()
    return {kind: {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in state.items() if k != "alibi_slopes"}
            for kind in ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("op_name", ["msg", "zero"])
def test_keep_rule_copies_old_coordinates_and_zeroes_new(op_name):
    old = ModelSpec(layers=2, hidden=16, ffn=24, heads=4, kv_heads=2, head_dim=4, vocab=20, tie_embeddings=False)
    new = old.with_shape(layers=3, hidden=24, ffn=30, heads=8, kv_heads=2)
    op = get_operator(op_name)
    _, _, plan = op.grow(build_model(old, seed=0).canonical_state(), old, new, layer_insert="1", moments="keep")
    m = random_moments(old, 3)
    for kind in ("exp_avg", "exp_avg_sq"):
        grown = op.grow_moments(m[kind], old, new, plan, kind=kind)
        # old block 1 moved to position 2; block 1 is new
        assert all(t.abs().sum() == 0 for k, t in grown.items() if k.startswith("layers.1."))
        up_old, up_new = m[kind]["layers.1.mlp.up.weight"], grown["layers.2.mlp.up.weight"]
        assert torch.equal(up_new[:24, :16], up_old) and up_new[24:].abs().sum() == 0 and up_new[:, 16:].abs().sum() == 0
        # group size 2 -> 4: old heads 0,1 | 2,3 sit at 0,1 | 4,5
        q_old, q_new = m[kind]["layers.0.attn.q.weight"], grown["layers.0.attn.q.weight"]
        assert torch.equal(q_new[0:8, :16], q_old[0:8]) and torch.equal(q_new[16:24, :16], q_old[8:16])
        assert q_new[8:16].abs().sum() == 0 and q_new[24:].abs().sum() == 0
        assert torch.equal(grown["head.weight"][:, :16], m[kind]["head.weight"])


def test_staged_rule_for_zero_rescales_by_the_stream_factor():
    old = ModelSpec(layers=1, hidden=16, ffn=24, heads=2, kv_heads=2, head_dim=8, vocab=20, tie_embeddings=True)
    new = old.with_shape(hidden=36, heads=2)
    new = new.with_shape(head_dim=8)
    op = get_operator("zero")
    _, _, plan = op.grow(build_model(old, seed=0).canonical_state(), old, new, moments="staged")
    m, c = random_moments(old, 4), math.sqrt(36 / 16)
    for kind, p in (("exp_avg", 1), ("exp_avg_sq", 2)):
        grown = op.grow_moments(m[kind], old, new, plan, kind=kind)
        torch.testing.assert_close(grown["embed.weight"][:, :16], m[kind]["embed.weight"] / c ** p)
        torch.testing.assert_close(grown["layers.0.attn.o.weight"][:16], m[kind]["layers.0.attn.o.weight"] / c ** p)
        torch.testing.assert_close(grown["layers.0.attn_norm.weight"][:16], m[kind]["layers.0.attn_norm.weight"] * c ** p)
        torch.testing.assert_close(grown["final_norm.weight"][:16], m[kind]["final_norm.weight"] * c ** (2 * p))
        torch.testing.assert_close(grown["layers.0.attn.q.weight"][:, :16], m[kind]["layers.0.attn.q.weight"])
        assert grown["embed.weight"][:, 16:].abs().sum() == 0


def test_clone_staged_rule_tiles_and_scales_moments():
    old = ModelSpec(layers=1, hidden=8, ffn=12, heads=2, kv_heads=1, head_dim=4, vocab=10, tie_embeddings=False)
    new = old.with_shape(hidden=16, ffn=36, heads=4, kv_heads=2)  # x2 width and heads, x3 FFN
    op = get_operator("clone")
    _, _, plan = op.grow(build_model(old, seed=0).canonical_state(), old, new)
    assert plan.moments_rule == "staged"
    m = random_moments(old, 5)
    for kind, p in (("exp_avg", 1), ("exp_avg_sq", 2)):
        grown = op.grow_moments(m[kind], old, new, plan, kind=kind)
        mo = m[kind]
        torch.testing.assert_close(grown["layers.0.attn.q.weight"], mo["layers.0.attn.q.weight"].repeat(2, 2) / 2 ** p)
        torch.testing.assert_close(grown["layers.0.attn.k.weight"], mo["layers.0.attn.k.weight"].repeat(2, 2) / 2 ** p)
        torch.testing.assert_close(grown["layers.0.mlp.up.weight"], mo["layers.0.mlp.up.weight"].repeat(3, 2) / 3 ** p)
        torch.testing.assert_close(grown["layers.0.mlp.down.weight"], mo["layers.0.mlp.down.weight"].repeat(2, 3) / 2 ** p)
        torch.testing.assert_close(grown["embed.weight"], mo["embed.weight"].repeat(1, 2) / 2 ** p)
        torch.testing.assert_close(grown["head.weight"], mo["head.weight"].repeat(1, 2))  # 2 copies x 1/2: s = 1
        torch.testing.assert_close(grown["layers.0.attn_norm.weight"], mo["layers.0.attn_norm.weight"].repeat(2) / 2 ** p)


def adam_update(model, data, moments, step, lr=1e-2):
    """One AdamW step from the given moments; returns {name: new - old}."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-30)
    params = dict(model.named_parameters())
    loss = model.loss(data)
    loss.backward()
    for name, p in params.items():
        opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": moments["exp_avg"][name].clone(),
                        "exp_avg_sq": moments["exp_avg_sq"][name].clone()}
    before = {k: v.detach().clone() for k, v in params.items()}
    opt.step()
    return {k: params[k].detach() - before[k] for k in params}


@pytest.mark.parametrize("rule", ["staged", "keep"])
def test_clone_staged_rule_keeps_the_training_dynamics(rule):
    """With `staged` moments, each copy's first Adam update equals its old entry's update
    (times the copy's scale only where the old entry's value is copied unscaled); `keep`
    leaves the second moments n^2 too large and the updates differ."""
    old = ModelSpec(layers=1, hidden=8, ffn=12, heads=2, kv_heads=2, head_dim=4, vocab=10, tie_embeddings=False,
                    norm="layernorm")
    new = old.with_shape(hidden=16, ffn=24, heads=4, kv_heads=4)
    small = build_model(old, seed=0)
    data = torch.randint(0, 10, (4, 9), generator=torch.Generator().manual_seed(1))
    # moments from a short history of real gradients, so m and v are consistent
    m = {"exp_avg": {}, "exp_avg_sq": {}}
    small.zero_grad()
    small.loss(data).backward()
    for k, p in small.named_parameters():
        m["exp_avg"][k], m["exp_avg_sq"][k] = 0.5 * p.grad.clone(), 0.5 * p.grad.clone() ** 2
    small.zero_grad()
    big, _, plan = grow_model("clone", small, old, new, "append", None, 0, moments=rule)
    grown_m = {k: get_operator("clone").grow_moments(m[k], old, new, plan, kind=k) for k in m}
    d_small = adam_update(small, data, m, 10)
    d_big = adam_update(big, data, grown_m, 10)
    q_small, q_big = d_small["layers.0.attn.q.weight"], d_big["layers.0.attn.q.weight"]
    same = torch.allclose(q_big, q_small.repeat(2, 2), rtol=1e-3, atol=1e-7)
    assert same == (rule == "staged")


# -- validation ------------------------------------------------------------------------

BASE = ModelSpec(layers=2, hidden=16, ffn=32, heads=4, kv_heads=2, head_dim=4, vocab=20)
REFUSED = [
    ("msg", dict(hidden=8), {}, "hidden", ">= 16"),
    ("msg", dict(heads=4, kv_heads=4), {}, "kv_heads", "allowed: 2"),
    ("msg", dict(heads=6, kv_heads=4), {}, "kv_heads", "allowed: 1, 2, 3, 6"),
    ("msg", dict(layers=4), dict(layer_insert="1,1"), "layer_insert", "distinct"),
    ("msg", dict(layers=4), dict(layer_insert="middle"), "layer_insert", "allowed: append, interleave"),
    ("msg", dict(layers=3), dict(init="zeros"), "init", "allowed: random, copy"),
    ("msg", dict(layers=3), dict(moments="reset"), "moments", "allowed: keep, staged"),
    ("zero", dict(head_dim=8), {}, "head_dim", "allowed: 4"),
    ("zero", dict(layers=3), dict(init="copy"), "init", "allowed: random"),
    ("zero", dict(norm="layernorm"), {}, "norm", "allowed: 'rmsnorm'"),
    ("clone", dict(hidden=24), {}, "hidden", "allowed: 16, 32, 48"),
    ("clone", dict(ffn=48), {}, "ffn", "allowed: 32, 64"),
    ("clone", dict(heads=8, kv_heads=8), {}, "kv_heads", "allowed: 2, 4"),
    ("clone", dict(heads=6, kv_heads=2), {}, "heads", "not a multiple of 4"),
    ("stack", dict(layers=3), {}, "layers", "allowed: 2, 4, 6"),
    ("stack", dict(hidden=32), {}, "hidden", "allowed: 16"),
    ("stack", dict(layers=4), dict(layer_insert="1,3"), "layer_insert", "allowed: append, interleave"),
    ("stack", dict(vocab=30), {}, "vocab", "allowed: 20"),
]


@pytest.mark.parametrize("op_name,change,options,field,allowed", REFUSED)
def test_impossible_targets_name_the_field_and_allowed_values(op_name, change, options, field, allowed):
    with pytest.raises(GrowthError) as err:
        get_operator(op_name).check(BASE, BASE.with_shape(**change), **options)
    assert err.value.field == field
    assert allowed in str(err.value)


def test_unknown_operator_lists_the_allowed_ones():
    with pytest.raises(GrowthError, match="allowed: msg, zero, clone, stack"):
        get_operator("net2net")
