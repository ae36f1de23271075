"""`grow grow` grows a checkpoint on disk tensor by tensor and gives exactly what the
operator gives in memory; a published (HF) model can be imported, grown and exported."""
from __future__ import annotations

import pytest
import torch

from growth_ops import ModelSpec, get_operator
from orchestrator.checkpoint.canonical import load_checkpoint
from orchestrator.cli import main
from orchestrator.offline.outputs import write_checkpoint_dir, write_safetensors_stream
from orchestrator.model import build_model

from ..conftest import hf_logits

OLD = ModelSpec(layers=2, hidden=16, ffn=24, heads=4, kv_heads=2, head_dim=4, vocab=31, tie_embeddings=False,
                norm="layernorm")
TARGETS = {  # operator -> (shape args, options)
    "msg": (dict(layers=3, hidden=24, ffn=30, heads=6), dict(layer_insert="1", ramp_steps="5", init="copy")),
    "zero": (dict(layers=3, hidden=24, ffn=30, heads=6), dict(layer_insert="interleave")),
    "clone": (dict(hidden=32, ffn=48, heads=8, kv_heads=4), dict()),
    "stack": (dict(layers=4), dict(layer_insert="interleave")),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_ckpt(path, spec, state, moments):
    def files(tmp):
        write_safetensors_stream(tmp / "model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in state.items()],
                                 state.items())
        optim = {f"{kind}.{k}": v for kind, d in moments.items() for k, v in d.items()}
        write_safetensors_stream(tmp / "optimizer.safetensors",
                                 [(k, v.dtype, tuple(v.shape)) for k, v in optim.items()], optim.items())
    write_checkpoint_dir(path, files, {"spec": spec.to_dict(), "masks": None, "optimizer_step": 7})


@pytest.mark.parametrize("op_name", list(TARGETS))
def test_streaming_growth_equals_in_memory_growth(tmp_path, op_name):
    shape, opts = TARGETS[op_name]
    small = build_model(OLD, seed=0)
    state = small.canonical_state()
    g = torch.Generator().manual_seed(1)
    moments = {k: {n: torch.rand(t.shape, generator=g) for n, t in state.items()} for k in ("exp_avg", "exp_avg_sq")}
    write_ckpt(tmp_path / "src", OLD, state, moments)
    args = [f"ckpt={tmp_path / 'src'}", f"out={tmp_path / 'dst'}", f"growth={op_name}", "seed=11"]
    args += [f"{k}={v}" for k, v in {**shape, **opts}.items()]
    assert main(["grow", *args]) == 0
    grown, grown_m, meta = load_checkpoint(tmp_path / "dst")
    new = ModelSpec.from_dict(meta["spec"])
    op = get_operator(op_name)
    ref, masks, plan = op.grow(state, OLD, new, ramp_steps=int(opts.get("ramp_steps", 0)),
                               layer_insert=opts.get("layer_insert", "append"), init=opts.get("init"),
                               generator=torch.Generator().manual_seed(11))
    assert set(grown) == set(ref)
    for k in ref:
        assert torch.equal(grown[k], ref[k]), k
    for kind in ("exp_avg", "exp_avg_sq"):
        want = op.grow_moments(moments[kind], OLD, new, plan, kind=kind)
        assert all(torch.equal(grown_m[kind][k], want[k]) for k in want)
    assert meta["optimizer_step"] == 7 and meta["offline_growth"]["operator"] == op_name
    assert (meta["masks"] is not None) == (op_name == "msg")
    if op.preserves_function:
        big = build_model(new)
        big.load_canonical(grown)
        from growth_ops import MaskState
        big.set_masks(MaskState.from_dict(meta["masks"]))
        tokens = torch.randint(0, OLD.vocab, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(big(tokens), small(tokens), rtol=1e-5, atol=1e-6)


def test_grow_command_refuses_impossible_targets(tmp_path, capsys):
    state = build_model(OLD, seed=0).canonical_state()
    write_ckpt(tmp_path / "src", OLD, state, {})
    code = main(["grow", f"ckpt={tmp_path / 'src'}", f"out={tmp_path / 'dst'}", "growth=clone", "hidden=24", "heads=6"])
    assert code == 2
    assert "hidden: clone tiles by integer factors: 24 is not a multiple of 16; allowed: 16, 32" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_hf_model_imported_grown_and_exported_keeps_its_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=47, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                   tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", f"src={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}"]) == 0
    assert main(["grow", f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'grown'}", "growth=clone",
                 "hidden=64", "ffn=96", "heads=8", "kv_heads=4"]) == 0
    assert main(["export-hf", f"ckpt={tmp_path / 'grown'}", f"out={tmp_path / 'hf2'}"]) == 0
    big = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2", attn_implementation="eager").eval()
    assert big.config.hidden_size == 64 and big.config.num_key_value_heads == 4
    tokens = torch.randint(0, 47, (2, 15))
    with torch.no_grad():
        before, after = hf_logits(hf, tokens), hf_logits(big, tokens)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
