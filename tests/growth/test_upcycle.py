"""Dense -> mixture of experts (issue 30): the MoE block, `upcycle` (exact: logits and
validation loss unchanged, Adam moments copied per expert), `drop_upcycle`, the
load-balancing loss and routing metrics, total and active parameters, the refusals, and
both engines and `grow expand` on the schedule tests/configs/schedule/moe_tiny.yaml."""
from __future__ import annotations

import json
import math

import pytest
import torch

from growth_ops import GrowthError, get_operator
from growth_ops.spec import ModelSpec, active_parameters, count_parameters, flops_per_token, parameter_axes
from orchestrator.cli import main
from orchestrator.commands.run_job import precheck
from orchestrator.model import DecoderLM, MoE, build_model, moe_metrics, moe_stats, set_aux_grad_scale

from ..conftest import REPO, fork_grow, read_summary

CONFIGS = REPO / "tests" / "configs"
DENSE = ModelSpec(layers=2, hidden=32, ffn=64, heads=2, kv_heads=2, head_dim=16, vocab=61)
MOE = {"experts": 4, "top_k": 2, "aux_loss_coef": 0.01}


def moe_of(dense: ModelSpec, **shape) -> ModelSpec:
    return ModelSpec(**{**dense.to_dict(), **MOE, **shape})


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 61, (3, 33), generator=torch.Generator().manual_seed(seed))


def grown(op: str, old: ModelSpec, new: ModelSpec, **kw):
    model = build_model(old, seed=1)
    state, _, plan = get_operator(op).grow(model.canonical_state(), old, new,
                                           generator=torch.Generator().manual_seed(2), **kw)
    after = DecoderLM(new)
    after.load_canonical(state)
    return model.eval(), after.eval(), state, plan


# -- upcycle: the function is kept --------------------------------------------------------

@pytest.mark.parametrize("arch, init, shape", [
    ({}, "zero", {}),
    ({"norm": "layernorm", "mlp": "gelu", "tie_embeddings": False}, "zero", {}),
    ({}, "zero", {"layers": 3, "hidden": 48, "heads": 3, "kv_heads": 3, "ffn": 96}),  # wider, deeper, MoE at once
    ({"norm": "layernorm"}, "zero", {"hidden": 48, "heads": 3, "kv_heads": 3, "ffn": 80}),
    ({}, "clone", {"hidden": 64, "heads": 4, "kv_heads": 4, "ffn": 128}),
    ({"parametrization": "mup", "mup_base_hidden": 32, "mup_output_mult": 2.0, "mup_embed_mult": 3.0,
      "mup_attn_scale": "inv"}, "clone", {"hidden": 64, "heads": 4, "kv_heads": 4, "ffn": 128}),
], ids=["same-shape", "layernorm-gelu-untied", "zero-wider-deeper", "zero-layernorm-wider", "clone-x2", "mup-clone"])
def test_upcycle_keeps_the_logits(arch, init, shape, one_torch_thread):
    old = ModelSpec(**{**DENSE.to_dict(), **arch})
    before, after, _, _ = grown("upcycle", old, moe_of(old, **shape), init=init)
    x = tokens()
    with torch.no_grad():
        a, b = before(x), after(x)
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    batch = tokens(3)
    with torch.no_grad():
        assert abs(before.loss(batch).item() - after.loss(batch).item()) <= 1e-6


def test_every_expert_is_the_dense_ffn_and_the_router_is_new():
    _, _, state, _ = grown("upcycle", DENSE, moe_of(DENSE))
    dense = build_model(DENSE, seed=1).canonical_state()
    for i in range(DENSE.layers):
        for t in ("up", "gate", "down"):
            experts = state[f"layers.{i}.mlp.experts.{t}.weight"]
            assert experts.shape[0] == 4
            for e in range(4):
                assert torch.equal(experts[e], dense[f"layers.{i}.mlp.{t}.weight"])
        router = state[f"layers.{i}.mlp.router.weight"]
        assert router.shape == (4, DENSE.hidden) and router.abs().sum() > 0  # small random: routing varies
    assert set(state) == set(parameter_axes(moe_of(DENSE)))


@pytest.mark.parametrize("init, rule, factor", [("zero", "keep", 1.0), ("clone", "staged", 0.5)])
def test_adam_moments_are_copied_per_expert_and_the_router_starts_at_zero(init, rule, factor):
    new = moe_of(DENSE, **({"hidden": 64, "heads": 4, "kv_heads": 4, "ffn": 128} if init == "clone" else {}))
    op = get_operator("upcycle")
    _, _, _, plan = grown("upcycle", DENSE, new, init=init)
    assert plan.moments_rule == rule
    g = torch.Generator().manual_seed(5)
    moments = {n: torch.rand(t.shape, generator=g) for n, t in build_model(DENSE, seed=1).canonical_state().items()}
    out = op.grow_moments(moments, DENSE, new, plan, "exp_avg")
    for e in range(4):
        copy = out["layers.1.mlp.experts.up.weight"][e][:DENSE.ffn, :DENSE.hidden]
        torch.testing.assert_close(copy, moments["layers.1.mlp.up.weight"] * factor, rtol=0, atol=0)
    assert not out["layers.1.mlp.router.weight"].any()
    sq = op.grow_moments(moments, DENSE, new, plan, "exp_avg_sq")["layers.0.mlp.experts.down.weight"][2]
    torch.testing.assert_close(sq[:DENSE.hidden, :DENSE.ffn], moments["layers.0.mlp.down.weight"] * factor ** 2,
                               rtol=0, atol=0)


# -- drop_upcycle -------------------------------------------------------------------------

def test_drop_upcycle_reinitialises_the_same_share_of_dims_in_up_gate_and_down():
    _, kept, up_state, _ = grown("upcycle", DENSE, moe_of(DENSE))
    _, dropped, state, plan = grown("drop_upcycle", DENSE, moe_of(DENSE), drop_ratio=0.25)
    assert plan.drop_ratio == 0.25
    for e in range(4):
        changed = {t: (state[f"layers.0.mlp.experts.{t}.weight"][e] != up_state[f"layers.0.mlp.experts.{t}.weight"][e])
                   for t in ("up", "gate", "down")}
        rows = [changed["up"].any(1), changed["gate"].any(1), changed["down"].any(0)]
        assert all(torch.equal(r, rows[0]) for r in rows) and int(rows[0].sum()) == DENSE.ffn // 4
    dims = [(state["layers.0.mlp.experts.up.weight"][e] != up_state["layers.0.mlp.experts.up.weight"][e]).any(1)
            for e in range(4)]
    assert not all(torch.equal(d, dims[0]) for d in dims)  # each expert drops its own dims
    with torch.no_grad():
        assert kept.loss(tokens(3)).item() != dropped.loss(tokens(3)).item()
    assert not get_operator("drop_upcycle").preserves_function
    assert get_operator("drop_upcycle").options().drop_ratio == 0.5  # Drop-Upcycling's default


# -- the block: routing, aux loss, capacity, metrics ---------------------------------------

def _moe_layer(**over) -> MoE:
    spec = moe_of(DENSE, **over)
    model = build_model(spec, seed=3)
    return model, model.layers[0].mlp


def test_aux_loss_reaches_the_router_through_the_gradient_only():
    """With identical experts the LM loss gives the router no gradient (renormalised weights
    sum to 1), so the router's gradient is exactly coef x d(aux)/d(router); the loss the
    model returns is the LM loss alone."""
    _, _, state, _ = grown("upcycle", DENSE, moe_of(DENSE, aux_loss_coef=0.5))
    model = DecoderLM(moe_of(DENSE, aux_loss_coef=0.5))
    model.load_canonical(state)
    model.train()
    set_aux_grad_scale(model, 0.5)  # as for two micro-batches
    batch = tokens(4)
    loss = model.loss(batch)
    loss.backward()
    router = model.layers[1].mlp.router.weight
    grad_with_aux = router.grad.clone()
    # the aux loss of that layer, recomputed: E x sum_e f_e P_e
    x = {}

    def keep_input(module, args):
        x["in"] = args[0].detach()

    hook = model.layers[1].mlp.register_forward_pre_hook(keep_input)
    with torch.no_grad():
        assert model.loss(batch).item() == pytest.approx(loss.item(), abs=0)  # no aux term in the loss
    hook.remove()
    flat = x["in"].reshape(-1, DENSE.hidden)
    w = router.detach().clone().requires_grad_(True)
    probs = (flat @ w.T).softmax(-1)
    counts = torch.bincount(probs.topk(2, -1).indices.flatten(), minlength=4).float()
    aux = 4 * (counts / flat.shape[0] * probs.mean(0)).sum()
    (0.5 * 0.5 * aux).backward()
    torch.testing.assert_close(grad_with_aux, w.grad, rtol=1e-4, atol=1e-7)
    tokens_per_expert, aux_sum, calls, dropped = moe_stats(model)
    assert calls == DENSE.layers and dropped == 0  # one training forward (the no_grad one is not counted)
    assert tokens_per_expert.sum().item() == DENSE.layers * flat.shape[0] * 2  # top_k assignments per token


def test_aux_loss_is_top_k_at_perfect_balance_and_metrics_say_so():
    model, layer = _moe_layer()
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities
    model.train()
    x = torch.randn(1, 16, DENSE.hidden)
    layer(x, None)  # grad enabled, training: counted
    tokens_per_expert, aux, calls, dropped = moe_stats(model)
    assert calls == 1 and aux == pytest.approx(2.0)  # E x sum(count_e / N x 1/E) = top_k
    metrics = moe_metrics(tokens_per_expert, aux, calls, dropped)
    assert metrics["moe/aux_loss"] == pytest.approx(2.0) and metrics["moe/dropped_tokens"] == 0
    assert sum(metrics[f"moe/tokens/expert_{e}"] for e in range(4)) == 32
    assert metrics["moe/max_load"] == pytest.approx(max(tokens_per_expert.tolist()) / 8)
    assert moe_stats(model)[2] == 0  # read once, reset


def test_capacity_drops_in_training_only():
    model, layer = _moe_layer(capacity_factor=0.5)
    x = torch.randn(2, 32, DENSE.hidden)
    model.train()
    y_train = layer(x, None)
    _, _, _, dropped = moe_stats(model)
    assert dropped >= 64 * 2 - 4 * math.ceil(0.5 * 64 * 2 / 4)  # at most capacity per expert kept
    model.eval()
    with torch.no_grad():
        y_eval = layer(x, None)
    model_dropless, dropless = _moe_layer()
    dropless.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(y_eval, dropless(x, None))  # evaluation is dropless
    assert not torch.allclose(y_train.detach(), y_eval)


# -- counting ------------------------------------------------------------------------------

def test_active_parameters_count_top_k_experts_and_the_router():
    spec = moe_of(DENSE)
    dense_total = count_parameters(DENSE)
    ffn = 3 * DENSE.hidden * DENSE.ffn  # up, gate, down
    router = 4 * DENSE.hidden
    assert count_parameters(spec) == dense_total + DENSE.layers * (3 * ffn + router)
    assert active_parameters(spec) == dense_total + DENSE.layers * (ffn + router)
    assert active_parameters(DENSE) == dense_total
    assert flops_per_token(spec, 64) - flops_per_token(DENSE, 64) == 6 * DENSE.layers * (ffn + router)


# -- the refusals: one line, exit 2, nothing written ---------------------------------------

def refused_moe(capsys, tmp_path, *overrides) -> str:
    run_dir = tmp_path / "run"
    code = precheck(["--config-dir", str(CONFIGS), "schedule=moe_tiny", f"hydra.run.dir={run_dir}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("grow: config error: "), err
    assert not run_dir.exists()
    return err


@pytest.mark.parametrize("overrides, words", [
    (["schedule.stages.1.moe.top_k=5"], "schedule.stages.1.moe.top_k: 5 is more than the stage's 4 experts"),
    (["schedule.stages.1.moe.experts=1"], "schedule.stages.1.moe.experts: must be >= 2"),
    (["schedule.stages.1.moe.top_k=0"], "schedule.stages.1.moe.top_k: must be > 0"),
    (["schedule.stages.1.moe.aux_loss_coef=nan"], "schedule.stages.1.moe.aux_loss_coef: must be a finite number"),
    (["schedule.stages.1.moe.aux_loss_coef=inf"], "schedule.stages.1.moe.aux_loss_coef: must be a finite number"),
    (["schedule.stages.1.moe.aux_loss_coef=-0.1"], "schedule.stages.1.moe.aux_loss_coef: must be >= 0"),
    (["schedule.stages.1.moe.capacity_factor=0"], "schedule.stages.1.moe.capacity_factor: must be > 0"),
    (["schedule.stages.1.moe.router=noisy"], "schedule.stages.1.moe.router: 'noisy' is not allowed"),
    (["schedule.stages.1.moe.expert_parallel=2"], "schedule.stages.1.moe.expert_parallel: 2: expert parallelism is not"),
    # upcycle of a model already MoE with another expert count
    (["schedule.stages.2.moe.experts=8", "schedule.stages.2.growth.operator=upcycle"],
     "schedule.stages.2.moe.experts: the model already has 4 experts"),
    (["schedule.stages.2.moe.top_k=1", "schedule.stages.2.growth.operator=upcycle"],
     "schedule.stages.2.moe.top_k: cannot change (2 -> 1)"),
    (["schedule.stages.2.moe=null", "schedule.stages.2.growth.operator=zero"],
     "schedule.stages.2.moe.experts: cannot go from 4 experts back to a dense FFN"),
    (["schedule.stages.2.shape.layers=3", "schedule.stages.2.growth.operator=zero"],
     "schedule.stages.2.growth.operator: zero cannot grow a mixture of experts"),
    (["schedule.stages.1.growth.operator=msg"], "schedule.stages.1.growth.operator: msg keeps the FFN dense"),
    (["schedule.stages.1.moe=null"], "schedule.stages.1.moe.experts: upcycle turns the dense FFN into experts"),
    (["schedule.stages.1.growth.drop_ratio=0.3"], "schedule.stages.1.growth.drop_ratio: upcycle re-initialises nothing"),
    (["schedule.stages.1.growth.operator=drop_upcycle", "schedule.stages.1.growth.drop_ratio=1.5"],
     "schedule.stages.1.growth.drop_ratio: must be in [0, 1]"),
    (["schedule.stages.1.growth.init=random"], "schedule.stages.1.growth.init: 'random' is not supported by upcycle"),
    (["schedule.stages.1.shape.ffn=96"], "schedule.stages.1.shape.ffn: clone tiles by integer factors"),
], ids=["top_k>experts", "experts<2", "top_k<1", "aux-nan", "aux-inf", "aux<0", "capacity-0", "router", "expert-parallel",
        "other-expert-count", "top_k-changes", "moe-to-dense", "grow-a-mixture", "msg-into-moe", "upcycle-to-dense",
        "drop_ratio-on-upcycle", "drop_ratio>1", "init", "clone-rule"])
def test_bad_moe_input_is_refused_in_one_line(capsys, tmp_path, overrides, words):
    assert words in refused_moe(capsys, tmp_path, *overrides)


def test_growth_errors_name_the_field():
    with pytest.raises(GrowthError) as e:
        get_operator("upcycle").check(moe_of(DENSE), moe_of(DENSE, experts=8))
    assert e.value.field == "experts"


# -- the runner, both engines, and grow expand ----------------------------------------------

@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, data_cache):
    """moe_tiny on the local engine: dense, then wider + deeper + upcycled in one transition,
    then the same mixture with another aux_loss_coef."""
    cwd = tmp_path_factory.mktemp("moe")
    fork_grow(cwd, "hydra.run.dir=local", "tracking.enabled=false", "--config-dir", str(CONFIGS),
              cache=data_cache, schedule="moe_tiny")
    return cwd, read_summary(cwd / "local")


def test_run_upcycles_exactly_and_reports_total_and_active_parameters(moe_run):
    _, summary = moe_run
    dense, moe, more_aux = summary["stages"]
    g = moe["growth"]
    assert g["operator"] == "upcycle" and g["preserves_function"]
    assert abs(g["val_loss_after"] - g["val_loss_before"]) <= 1e-5
    assert more_aux["growth"] is None  # a settings change, not a growth
    spec = ModelSpec.from_dict(json.loads(sorted((moe_run[0] / "local" / "checkpoints").glob("1-moe/step_*/meta.json"))[-1]
                                          .read_text())["spec"])
    assert spec.experts == 4 and spec.top_k == 2 and spec.layers == 2 and spec.hidden == 64
    assert moe["params"] == count_parameters(spec) and moe["active_params"] == active_parameters(spec)
    assert moe["experts"] == 4 and dense["experts"] == 0 and dense["active_params"] == dense["params"]
    assert moe["flops"] == pytest.approx(flops_per_token(spec, 64) * moe["tokens"])


def test_the_ledger_records_total_and_active_parameters(moe_run):
    cwd, _ = moe_run
    meta = json.loads(sorted((cwd / "local" / "checkpoints").glob("1-moe/step_*/meta.json"))[-1].read_text())
    ledger = meta["ledger"]["moe"]
    assert ledger["params"] > ledger["active_params"] > 0


def test_expand_upcycles_a_checkpoint_offline(moe_run, tmp_path, capsys):
    cwd, _ = moe_run
    ckpt = sorted((cwd / "local" / "checkpoints").glob("0-dense/step_*"))[-1]
    code = main(["expand", f"ckpt={ckpt}", f"out={tmp_path / 'up'}", "growth=upcycle", "experts=4", "hidden=64",
                 "ffn=128", "init=clone"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "experts=4 top_k=2" in out and "function preserved" in out
    meta = json.loads((tmp_path / "up" / "meta.json").read_text())
    assert meta["spec"]["experts"] == 4 and meta["offline_growth"]["check"]["within_tolerance"]
    code = main(["expand", f"ckpt={ckpt}", f"out={tmp_path / 'drop'}", "growth=drop_upcycle", "experts=4",
                 "drop_ratio=0.5"])
    out, err = capsys.readouterr()
    assert code == 0 and "not preserving" in out, err
    assert json.loads((tmp_path / "drop" / "meta.json").read_text())["offline_growth"]["drop_ratio"] == 0.5
    for bad, words in ((["experts=1"], "experts: 1 is not allowed"), (["experts=4", "top_k=5"], "more than the 4"),
                       (["experts=4", "aux_loss_coef=inf"], "not a finite number"),
                       (["top_k=2"], "give experts= too")):
        code = main(["expand", f"ckpt={ckpt}", f"out={tmp_path / 'bad'}", "growth=upcycle", *bad])
        _, err = capsys.readouterr()
        assert code == 2 and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_deepspeed_upcycles_exactly_with_dp_tp_and_pp_and_matches_local(moe_run, tmp_path, data_cache):
    """The same schedule on the deepspeed engine: the dense stage at DP=2, the upcycle into
    TP=2 (TP inside each expert), the last stage at PP=2; every stage's validation loss the
    local engine's."""
    _, local = moe_run
    fork_grow(tmp_path, "hydra.run.dir=ds", "tracking.enabled=false", "engine=deepspeed",
              "schedule.stages.0.layout.dp=2", "schedule.stages.1.layout.tp=2", "schedule.stages.2.layout.pp=2",
              "--config-dir", str(CONFIGS), cache=data_cache, schedule="moe_tiny", timeout=900)
    ds = read_summary(tmp_path / "ds")
    g = ds["stages"][1]["growth"]
    assert g["operator"] == "upcycle" and abs(g["val_loss_after"] - g["val_loss_before"]) <= 1e-5
    for a, b in zip(local["stages"], ds["stages"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=2e-4), (a["name"], a["val_loss"], b["val_loss"])


def test_grow_plan_shows_total_and_active_parameters_and_counts_flops_by_the_active(tmp_path, capsys):
    """schedule=upcycle (shipped): dense, wider, 4 experts; FLOPs from the active parameters,
    the memory check from all of them."""
    from ..conftest import grow_in_process

    code = grow_in_process("plan", "schedule=upcycle", f"hydra.run.dir={tmp_path / 'p'}")
    out = capsys.readouterr().out
    assert code == 0 and "active)" in out and "4 experts" in out
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    dense, wide, moe = plan["stages"]
    assert dense["active_params"] == dense["params"] and moe["experts"] == 4
    assert moe["params"] > moe["active_params"] > wide["params"]  # the router and a second expert are active
    spec = ModelSpec(layers=2, hidden=128, ffn=352, heads=4, kv_heads=4, head_dim=32, vocab=320, experts=4, top_k=2)
    assert (moe["params"], moe["active_params"]) == (count_parameters(spec), active_parameters(spec))
    assert moe["flops"] == pytest.approx(flops_per_token(spec, 128) * moe["tokens"])
    assert moe["state_gib_per_gpu"] / wide["state_gib_per_gpu"] == pytest.approx(moe["params"] / wide["params"])
    assert plan["scratch"]["active_params"] == moe["active_params"]
