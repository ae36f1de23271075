"""Mixtral interop: a mixture-of-experts checkpoint exports to a directory that
MixtralForCausalLM.from_pretrained loads with our logits (fp32, within 1e-5), and a Mixtral
directory (the Hub's per-expert layout or transformers' fused one) imports with its logits."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from growth_ops import ModelSpec  # noqa: E402
from orchestrator.checkpoint.canonical import load_checkpoint  # noqa: E402
from orchestrator.commands.hf import export_command, import_command  # noqa: E402
from orchestrator.model import build_model  # noqa: E402

from ..conftest import save_ours  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 61


def ours_moe(tied: bool, experts: int = 4, top_k: int = 2, seed: int = 3):
    """Our MoE model with norm gains and the router random (a zero router would hide a wrong
    expert order or a wrong renormalisation: every routing would give the same output)."""
    spec = ModelSpec(layers=2, hidden=32, ffn=24, heads=4, kv_heads=2, head_dim=8, vocab=VOCAB, rope_theta=1e6,
                     tie_embeddings=tied, experts=experts, top_k=top_k, aux_loss_coef=0.02)
    model = build_model(spec, seed=seed)
    state = model.canonical_state()
    g = torch.Generator().manual_seed(seed + 1)
    for k in state:
        if "norm" in k:
            state[k] = torch.rand(state[k].shape, generator=g) + 0.5
        elif k.endswith("router.weight"):
            state[k] = torch.randn(state[k].shape, generator=g)
    model.load_canonical(state)
    return spec, model.eval(), state


def random_mixtral(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=20, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, router_aux_loss_coef=0.03, max_position_embeddings=64,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("gate.weight"):  # the router: spread out, so routing differs per token
                p.normal_(0.0, 1.0)
    return model


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


def tokens(seed: int):
    return torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_as_mixtral_with_our_logits(tmp_path, tied):
    spec, ours, state = ours_moe(tied)
    save_ours(tmp_path / "ckpt", spec, state)
    assert export_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == ("mixtral", 4, 2)
    assert cfg["router_aux_loss_coef"] == pytest.approx(0.02)
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:  # the Hub's per-expert layout
        keys = set(f.keys())
        torch.testing.assert_close(f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w1.weight"),
                                   state["layers.1.mlp.experts.gate.weight"][3], rtol=0, atol=0)
    assert "model.layers.0.block_sparse_moe.experts.0.w3.weight" in keys
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = tokens(5)
    mine = logits(ours, x)
    torch.testing.assert_close(logits(hf, x), mine, rtol=1e-5, atol=1e-5 * mine.abs().max().item())


def test_import_gives_mixtral_logits_and_round_trips(tmp_path, capsys):
    hf = random_mixtral()
    hf.save_pretrained(tmp_path / "hf")
    assert import_command([f"src={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}"]) == 0
    assert "experts=4 top_k=2" in capsys.readouterr().out
    state, _, meta = load_checkpoint(tmp_path / "ckpt")
    spec = ModelSpec.from_dict(meta["spec"])
    assert (spec.experts, spec.top_k, spec.capacity_factor, spec.ffn) == (4, 2, None, 20)
    assert spec.aux_loss_coef == pytest.approx(0.03)
    ours = build_model(spec)
    ours.load_canonical(state)
    x = tokens(1)
    ref = logits(hf, x)
    torch.testing.assert_close(logits(ours.eval(), x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # and back: the export holds exactly the tensors transformers saved
    assert export_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'back'}"]) == 0
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "back" / "model.safetensors", framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_import_reads_transformers_fused_expert_layout(tmp_path):
    hf = random_mixtral(seed=1)
    hf.save_pretrained(tmp_path / "hub")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}  # the module's own names: mlp.experts.gate_up_proj
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, fused / "model.safetensors")
    for src, out in (("hub", "a"), ("fused", "b")):
        assert import_command([f"src={tmp_path / src}", f"out={tmp_path / out}"]) == 0
    a, _, _ = load_checkpoint(tmp_path / "a")
    b, _, _ = load_checkpoint(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_import_refuses_sliding_window_and_bad_expert_counts(tmp_path, capsys):
    hf = random_mixtral()
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, line in (({"sliding_window": 16}, "sliding_window: 16 is not supported"),
                         ({"num_experts_per_tok": 5}, "num_experts_per_tok: 5 is not in [1, num_local_experts=4]")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **change}))
        assert import_command([f"src={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}"]) == 2
        assert line in capsys.readouterr().err
        assert not (tmp_path / "ckpt").exists()


def test_export_refuses_gelu_experts(tmp_path, capsys):
    spec = ModelSpec(layers=1, hidden=16, ffn=32, heads=2, kv_heads=2, head_dim=8, vocab=20, mlp="gelu",
                     experts=2, top_k=1)
    save_ours(tmp_path / "ckpt", spec, build_model(spec, seed=0).canonical_state())
    assert export_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"]) == 2
    assert "model.mlp: 'gelu' has no Mixtral equivalent (its experts are SwiGLU); allowed: swiglu" \
        in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_import_refuses_an_expert_of_another_shape(tmp_path, capsys):
    from safetensors.torch import load_file
    random_mixtral().save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    sd[key] = sd[key][:, :19].contiguous()  # one expert narrower than the config's intermediate_size
    save_file(sd, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()  # transformers' own progress output
    assert import_command([f"src={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{key} has shape (32, 19)" in err, err
    assert not (tmp_path / "ckpt").exists()
