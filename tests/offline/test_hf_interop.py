"""Hugging Face Llama interop: import -> our model gives transformers' logits, export ->
LlamaForCausalLM.from_pretrained gives ours (fp32, eager attention, no downloads)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from growth_ops import ModelSpec  # noqa: E402
from orchestrator.checkpoint.canonical import load_checkpoint  # noqa: E402
from orchestrator.commands.hf import export_command, import_command  # noqa: E402
from orchestrator.model import build_model  # noqa: E402

from ..conftest import hf_logits, random_llama, save_ours  # noqa: E402

CASES = [  # (heads, kv_heads, tied, rope_theta)
    (4, 4, True, 10000.0),
    (4, 2, False, 500000.0),
    (6, 2, True, 1000.0),
    (4, 1, False, 10000.0),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_model(heads, kv_heads, tied, theta, seed=0):
    return random_llama(vocab=61, hidden=8 * heads, heads=heads, kv_heads=kv_heads, ffn=40, tied=tied, theta=theta,
                        seed=seed)


@pytest.mark.parametrize("heads,kv_heads,tied,theta", CASES)
def test_import_gives_transformers_logits(tmp_path, heads, kv_heads, tied, theta):
    hf = hf_model(heads, kv_heads, tied, theta)
    hf.save_pretrained(tmp_path / "hf")
    assert import_command([f"src={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}"]) == 0
    state, moments, meta = load_checkpoint(tmp_path / "ckpt")  # verifies the manifest too
    spec = ModelSpec.from_dict(meta["spec"])
    assert (spec.heads, spec.kv_heads, spec.tie_embeddings, spec.rope_theta) == (heads, kv_heads, tied, theta)
    ours = build_model(spec)
    ours.load_canonical(state)
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours(tokens)
    ref = hf_logits(hf.float(), tokens)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("heads,kv_heads,tied,theta", CASES)
def test_export_loads_in_transformers_with_our_logits(tmp_path, heads, kv_heads, tied, theta):
    spec = ModelSpec(layers=2, hidden=8 * heads, ffn=36, heads=heads, kv_heads=kv_heads, head_dim=8, vocab=53,
                     rope_theta=theta, tie_embeddings=tied)
    ours = build_model(spec, seed=3)
    state = ours.canonical_state()
    g = torch.Generator().manual_seed(4)
    for k in state:
        if "norm" in k:
            state[k] = torch.rand(state[k].shape, generator=g) + 0.5
    ours.load_canonical(state)
    save_ours(tmp_path / "ckpt", spec, state)
    assert export_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings == tied
    tokens = torch.randint(0, 53, (3, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mine = ours(tokens)
    ref = hf_logits(hf, tokens)
    torch.testing.assert_close(ref, mine, rtol=1e-5, atol=1e-5 * mine.abs().max().item())


def test_export_refuses_architectures_llama_does_not_have(tmp_path, capsys):
    spec = ModelSpec(layers=1, hidden=16, ffn=32, heads=2, kv_heads=2, head_dim=8, vocab=20, mlp="gelu")
    save_ours(tmp_path / "ckpt", spec, build_model(spec, seed=0).canonical_state())
    assert export_command([f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"]) == 2
    assert "model.mlp: 'gelu' has no Llama equivalent; allowed: swiglu" in capsys.readouterr().err


def test_import_refuses_rope_scaling(tmp_path, capsys):
    hf = hf_model(4, 2, True, 10000.0)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert import_command([f"src={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}"]) == 2
    assert "rope_parameters.rope_type: 'linear' is not supported; allowed: default" in capsys.readouterr().err
