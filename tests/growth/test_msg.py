"""MSG preserves the function exactly at mask 0, on every architecture option, and the
grown model then trains: new parameters get gradients and the loss falls."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from growth_ops import GrowthError, ModelSpec, msg
from orchestrator.model import build_model


def spec_strategy():
    @st.composite
    def draw(draw):
        kv = draw(st.integers(1, 2))
        group = draw(st.integers(1, 2))
        old = ModelSpec(layers=draw(st.integers(1, 2)), hidden=draw(st.sampled_from([16, 24])),
                        ffn=draw(st.integers(8, 40)), heads=kv * group, kv_heads=kv, head_dim=8,
                        vocab=37, norm=draw(st.sampled_from(["rmsnorm", "layernorm"])),
                        mlp=draw(st.sampled_from(["swiglu", "gelu"])),
                        position=draw(st.sampled_from(["rope", "alibi"])),
                        tie_embeddings=draw(st.booleans()))
        new_kv = kv + draw(st.integers(0, 2))
        new_group = group + draw(st.integers(0, 1))
        new = old.with_shape(layers=old.layers + draw(st.integers(0, 2)),
                             hidden=old.hidden + draw(st.sampled_from([0, 8, 40])),
                             ffn=old.ffn + draw(st.integers(0, 30)),
                             heads=new_kv * new_group, kv_heads=new_kv)
        return old, new, draw(st.sampled_from(["append", "interleave"])), draw(st.integers(0, 999))
    return draw()


def grown_model(old_model, old, new, insert, seed, ramp=10):
    state, masks, _ = msg.OPERATOR.grow(old_model.canonical_state(), old, new, ramp_steps=ramp,
                               layer_insert=insert, generator=torch.Generator().manual_seed(seed))
    model = build_model(new)
    model.load_canonical(state)
    model.set_masks(masks)
    return model, masks


@settings(max_examples=60, deadline=None)
@given(spec_strategy())
def test_msg_preserves_logits_and_loss(case):
    old, new, insert, seed = case
    torch.manual_seed(seed)
    small = build_model(old, seed=seed)
    batch = torch.randint(0, old.vocab, (3, 13))
    big, _ = grown_model(small, old, new, insert, seed + 1)
    with torch.no_grad():
        before, after = small(batch[:, :-1]), big(batch[:, :-1])
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
        assert abs(big.loss(batch).item() - small.loss(batch).item()) <= 1e-5 * small.loss(batch).item()


def test_grown_model_trains_through_the_ramp():
    old = ModelSpec(layers=2, hidden=32, ffn=64, heads=2, kv_heads=1, head_dim=16, vocab=50)
    new = old.with_shape(layers=4, hidden=64, ffn=128, heads=4, kv_heads=2)
    small = build_model(old, seed=0)
    big, masks = grown_model(small, old, new, "interleave", 1, ramp=5)
    opt = torch.optim.AdamW(big.parameters(), lr=3e-3)
    data = torch.randint(0, 50, (8, 17))
    losses, start = [], {k: v.clone() for k, v in big.canonical_state().items()}
    for _ in range(12):
        big.set_masks(masks)
        loss = big.loss(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.advance()
        losses.append(loss.item())
    big.set_masks(masks)
    assert masks.done and big.hidden_mask is None  # finished ramp: masks removed
    assert losses[-1] < losses[0]
    end = big.canonical_state()
    # New layers and the new columns of old layers moved.
    assert not torch.equal(end["layers.1.mlp.down.weight"], start["layers.1.mlp.down.weight"])
    assert not torch.equal(end["layers.0.attn.q.weight"][32:], start["layers.0.attn.q.weight"][32:])
    assert not torch.equal(end["embed.weight"][:, 32:], start["embed.weight"][:, 32:])


def test_moments_copied_for_old_coordinates_zero_for_new():
    old = ModelSpec(layers=1, hidden=16, ffn=32, heads=2, kv_heads=1, head_dim=8, vocab=20)
    new = old.with_shape(layers=2, hidden=24, ffn=40, heads=4, kv_heads=1)
    maps = msg.plan_growth(old, new)
    moments = {k: torch.rand_like(v) for k, v in build_model(old, seed=0).canonical_state().items()}
    grown = msg.OPERATOR.grow_moments(moments, old, new, maps)
    q_old, q_new = moments["layers.0.attn.q.weight"], grown["layers.0.attn.q.weight"]
    # group size 2 -> 4: old heads 0,1 stay at positions 0,1; heads 2,3 are new
    torch.testing.assert_close(q_new[:16, :16], q_old, rtol=0, atol=0)
    assert q_new[16:].abs().sum() == 0 and q_new[:, 16:].abs().sum() == 0
    assert grown["layers.1.mlp.up.weight"].abs().sum() == 0
    assert grown["layers.0.mlp.down.weight"][:16, :32].equal(moments["layers.0.mlp.down.weight"])


@pytest.mark.parametrize("field,change", [
    ("hidden", dict(hidden=8)), ("layers", dict(layers=1)), ("head_dim", dict(head_dim=4)),
    ("kv_heads", dict(heads=6, kv_heads=4)), ("kv_heads", dict(heads=4, kv_heads=4)),
    ("vocab", dict(vocab=30)), ("norm", dict(norm="layernorm")),
])
def test_impossible_growth_names_the_field(field, change):
    old = ModelSpec(layers=2, hidden=16, ffn=32, heads=2, kv_heads=1, head_dim=8, vocab=20)
    with pytest.raises(GrowthError) as err:
        msg.check_growth(old, old.with_shape(**change))
    assert err.value.field == field
