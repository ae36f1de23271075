"""muP (model.parametrization=mup): init and per-group Adam rates by width, growth that keeps
the function exactly while the width multiplier changes (every preserving operator, tied
and untied, the local and the deepspeed engine), rates that follow the new width from the
first step after a growth, the parametrization recorded in checkpoints and HF export folding
(bad muP settings: tests/config/test_refusals.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from growth_ops import ModelSpec, get_operator
from growth_ops.spec import INPUT_SCALE
from orchestrator.commands.run_job import precheck
from orchestrator.config.schema import TrainConfig
from orchestrator.engines.base import adamw, set_lr
from orchestrator.engines.local import LocalEngine
from orchestrator.model import build_model
from orchestrator.run.runner import run_schedule
from orchestrator.schedule import resolve

from ..conftest import REPO, fork_grow, hf_logits, read_summary, save_ours

CONFIGS = REPO / "tests" / "configs"
PRESERVING = ["msg", "zero", "clone"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mup_spec(hidden: int, tied: bool, layers: int = 2, base: int = 16) -> ModelSpec:
    return ModelSpec(layers=layers, hidden=hidden, ffn=2 * hidden, heads=hidden // 8, kv_heads=hidden // 8,
                     head_dim=8, vocab=61, tie_embeddings=tied, parametrization="mup", mup_base_hidden=base,
                     mup_output_mult=2.0, mup_embed_mult=3.0, mup_attn_scale="inv")


def test_init_and_learning_rates_follow_the_width_multiplier():
    spec = mup_spec(256, tied=False, base=16)  # m = 16
    model = build_model(spec, seed=0)
    state = model.canonical_state()
    # hidden matrices at init_std / sqrt(m); embeddings and readout at the base's init_std
    assert state["layers.0.attn.q.weight"].std().item() == pytest.approx(0.02 / 4, rel=0.03)
    assert state["embed.weight"].std().item() == pytest.approx(0.02, rel=0.03)
    assert state["head.weight"].std().item() == pytest.approx(0.02, rel=0.03)
    opt = adamw(model.named_parameters(), TrainConfig(), spec)
    set_lr(opt, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            hidden = p.ndim == 2 and names[id(p)] not in ("embed.weight", "head.weight")
            assert group["lr"] == pytest.approx(1e-3 / 16 if hidden else 1e-3), names[id(p)]
            assert group["weight_decay"] == (0.1 if p.ndim == 2 else 0.0)
    # the standard parametrization: today's two groups, every one at the schedule's rate
    std = build_model(ModelSpec(layers=2, hidden=256, ffn=512, heads=32, kv_heads=32, head_dim=8, vocab=61))
    opt = adamw(std.named_parameters(), TrainConfig(), std.spec)
    set_lr(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]


def test_multipliers_are_in_the_forward_pass():
    """Logits scale with output_mult / m, the embedding with embed_mult, scores with 1/d."""
    spec = mup_spec(32, tied=False)
    model = build_model(spec, seed=1)
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
        doubled = build_model(ModelSpec(**{**spec.to_dict(), "mup_output_mult": 4.0}))
        doubled.load_canonical(model.canonical_state())
        torch.testing.assert_close(doubled(tokens), 2 * logits)
        sqrt = build_model(ModelSpec(**{**spec.to_dict(), "mup_attn_scale": "sqrt"}))
        sqrt.load_canonical(model.canonical_state())
        assert not torch.allclose(sqrt(tokens), logits)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("op_name", PRESERVING)
def test_growth_keeps_the_logits_and_reparametrizes_the_readout(op_name, tied):
    old, new = mup_spec(32, tied), mup_spec(64, tied, layers=2 if op_name == "clone" else 3)
    small = build_model(old, seed=2)
    state = small.canonical_state()
    g = torch.Generator().manual_seed(3)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.ndim else v for k, v in state.items()}
    small.load_canonical(state)
    moments = {k: {n: torch.rand(v.shape, generator=g) for n, v in small.named_parameters()}
               for k in ("exp_avg", "exp_avg_sq")}
    op = get_operator(op_name)
    grown, masks, plan = op.grow(state, old, new, ramp_steps=4, generator=torch.Generator().manual_seed(4))
    big = build_model(new)
    big.load_canonical(grown)
    big.set_masks(masks)
    tokens = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before, after = small(tokens), big(tokens)
    assert new.readout_mult == old.readout_mult / 2  # the readout factor is the new width's
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    # the same growth under the standard parametrization differs only by muP's factor r = 2
    # on the readout's copied entries (and their moments by 1/r, 1/r^2)
    as_std = {f: None for f in ("mup_base_hidden", "mup_output_mult", "mup_embed_mult", "mup_attn_scale")}
    s_old, s_new = (ModelSpec(**{**s.to_dict(), **as_std, "parametrization": "standard"}) for s in (old, new))
    plain, _, plain_plan = op.grow({k: v for k, v in state.items() if k != INPUT_SCALE}, s_old, s_new,
                                   ramp_steps=4, generator=torch.Generator().manual_seed(4))
    readout = "embed.weight" if tied else "head.weight"
    h = old.hidden
    torch.testing.assert_close(grown[readout][:, :h], 2 * plain[readout][:, :h])
    for kind, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
        mine = op.grow_moments(moments[kind], old, new, plan, kind)[readout]
        ref = op.grow_moments(moments[kind], s_old, s_new, plain_plan, kind)[readout]
        torch.testing.assert_close(mine, ref / 2 ** power)
    if tied:  # the input side keeps its values: the recorded scale takes the factor back
        assert grown[INPUT_SCALE].item() == 0.5


def mup_run_config(tmp_path, data_cache, *extra: str):
    cfg = precheck(["--config-dir", str(CONFIGS), "schedule=mup_widths", "model.parametrization=mup",
                    "tracking.enabled=false", "engine.threads=1", f"data.cache_dir={data_cache}",
                    "checkpoint.every_steps=1000", f"hydra.run.dir={tmp_path / 'run'}", *extra])
    assert not isinstance(cfg, int), "the config was refused"
    return cfg


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_run_grows_exactly_and_rates_follow_the_new_width(tmp_path, data_cache, monkeypatch, tied):
    """msg, zero and clone widen 32 -> 64 -> 128 -> 256 under muP in one local run; each
    growth passes the runner's check, and from the first step after it the hidden
    matrices train at lr * 32 / hidden, the rest at lr."""
    cfg = mup_run_config(tmp_path, data_cache, f"model.tie_embeddings={str(tied).lower()}")
    specs = [s.spec for s in resolve(cfg, 257)]
    assert [s.mup_base_hidden for s in specs] == [32] * 4  # null: the first stage's hidden
    seen = []
    train_step = LocalEngine.train_step

    def recording(self, batch, lr):
        out = train_step(self, batch, lr)
        hidden = {id(p) for n, p in self.model.named_parameters() if p.ndim == 2 and n not in ("embed.weight", "head.weight")}
        seen.append((self.spec.hidden, lr, [(g["lr"], all(id(p) in hidden for p in g["params"]))
                                           for g in self.optimizer.param_groups]))
        return out

    monkeypatch.setattr(LocalEngine, "train_step", recording)
    summary = run_schedule(cfg, console=Console(file=io.StringIO()))
    assert summary["status"] == "complete"
    growths = [s["growth"] for s in summary["stages"][1:]]
    assert [g["operator"] for g in growths] == PRESERVING
    for g in growths:
        assert abs(g["val_loss_after"] - g["val_loss_before"]) <= 1e-5, g
    first_steps = {}
    for hidden, lr, groups in seen:
        first_steps.setdefault(hidden, groups)
        assert len(groups) == 3
        for group_lr, is_hidden in groups:
            assert group_lr == pytest.approx(lr * 32 / hidden if is_hidden else lr)
    assert sorted(first_steps) == [32, 64, 128, 256]


def test_checkpoint_records_the_parametrization(tmp_path, data_cache, capsys):
    """A muP checkpoint is not read as standard: init_from refuses it by name, before the run,
    and the checkpoint's meta.json spec says mup."""
    cfg = mup_run_config(tmp_path, data_cache, "schedule.stages.0.tokens=256", "schedule.stages.0.lr.warmup_steps=0",
                         "run.only_stage=w32")
    run_schedule(cfg, console=Console(file=io.StringIO()))
    ckpt = read_summary(tmp_path / "run")["stages"][0]["checkpoint"]
    assert json.loads((Path(ckpt) / "meta.json").read_text())["spec"]["parametrization"] == "mup"
    capsys.readouterr()
    assert precheck(["--config-dir", str(CONFIGS), "schedule=mup_widths", "tracking.enabled=false",
                     f"data.cache_dir={data_cache}", f"hydra.run.dir={tmp_path / 'plain'}", f"init_from={ckpt}"]) == 2
    assert "(model.parametrization=standard, " in capsys.readouterr().err


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_export_folds_the_multipliers(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    from orchestrator.commands.hf import export_command

    old, new = mup_spec(32, tied), mup_spec(64, tied)
    state, _, _ = get_operator("clone").grow(build_model(old, seed=6).canonical_state(), old, new)
    ours = build_model(new)
    ours.load_canonical(state)
    if tied:
        assert state[INPUT_SCALE].item() == 0.5  # a grown model: the recorded scale is not 1
    save_ours(tmp_path / "ckpt", new, state)
    assert export_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings is False
    tokens = torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mine, ref = ours(tokens), hf_logits(hf, tokens)
    torch.testing.assert_close(ref, mine, rtol=1e-5, atol=1e-5 * mine.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_deepspeed_grows_exactly_under_mup_and_matches_local(tmp_path, data_cache, tied):
    """The same three muP widenings on the deepspeed engine (TP=2, DP=1, gloo): every growth
    within 1e-5, and each stage's validation loss the local engine's."""
    common = ["model.parametrization=mup", "tracking.enabled=false", f"model.tie_embeddings={str(tied).lower()}"]
    flag = ["--config-dir", str(CONFIGS)]  # after the overrides: Hydra's parser takes them as one list
    fork_grow(tmp_path, *common, "hydra.run.dir=local", *flag, cache=data_cache, schedule="mup_widths")
    fork_grow(tmp_path, *common, "engine=deepspeed", *[f"schedule.stages.{i}.layout.tp=2" for i in range(4)],
              "hydra.run.dir=ds", *flag, cache=data_cache, schedule="mup_widths", timeout=900)
    want, got = read_summary(tmp_path / "local"), read_summary(tmp_path / "ds")
    assert got["status"] == "complete"
    for w, g in zip(want["stages"], got["stages"], strict=True):
        assert abs(g["val_loss"] - w["val_loss"]) <= 1e-5 * w["val_loss"], (w, g)
        if g["growth"]:
            assert abs(g["growth"]["val_loss_after"] - g["growth"]["val_loss_before"]) <= 1e-5


@pytest.mark.parametrize("op_name", ["zero", "clone"])
def test_offline_expand_of_a_mup_checkpoint_is_checked_and_exact(tmp_path, op_name):
    """`grow expand` streams the grown muP state (the tied input scale included) and its
    own check passes; the result equals the in-memory growth."""
    from orchestrator.checkpoint.canonical import load_checkpoint
    from orchestrator.commands.expand import expand_command

    old = mup_spec(32, tied=True)
    state = build_model(old, seed=8).canonical_state()
    save_ours(tmp_path / "ckpt", old, state)
    assert expand_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'g'}", f"growth={op_name}",
                           "hidden=64", "ffn=128"]) == 0
    grown, _, meta = load_checkpoint(tmp_path / "g")
    new = ModelSpec.from_dict(meta["spec"])
    assert new.is_mup and new.width_mult == 4 and grown[INPUT_SCALE].item() == 0.5
    want, _, _ = get_operator(op_name).grow(state, old, new, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(grown["embed.weight"], want["embed.weight"])
