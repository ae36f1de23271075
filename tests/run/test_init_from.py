"""A published (here: randomly built, saved) Llama model is the starting point of a schedule:
`grow import-hf`, then `grow run init_from=CKPT`; stage 1 starts from exactly its weights,
grown into stage 1's shape with a preserving operator."""
from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")

from orchestrator.config.schema import DataConfig, SourceConfig  # noqa: E402
from orchestrator.data import prepare_data, validation_batches  # noqa: E402
from orchestrator.commands.hf import import_command  # noqa: E402

from ..conftest import fork_grow, hf_logits, read_summary  # noqa: E402

pytestmark = pytest.mark.slow


def test_schedule_starts_from_an_imported_llama(tmp_path, data_cache):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                   tie_word_embeddings=True, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert import_command([f"src={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}"]) == 0

    # stage 1 of `tiny` is wider (64, heads 4, kv 2) than the imported model: MSG grows it
    run_dir = tmp_path / "run"
    fork_grow(tmp_path, f"hydra.run.dir={run_dir}", f"init_from={tmp_path / 'ckpt'}", "tracking=off",
              "schedule.stages.0.shape.hidden=64", "schedule.stages.0.shape.ffn=128",
              "schedule.stages.0.shape.heads=4", "schedule.stages.0.shape.kv_heads=2",
              "growth.ramp_steps=8", cache=data_cache)
    first = read_summary(run_dir)["stages"][0]
    assert first["growth"]["operator"] == "msg"

    # the loss before growing is transformers' own loss of the imported model on the same batches
    data = prepare_data(DataConfig(sources={"stdlib": SourceConfig(kind="embedded")}, cache_dir=str(data_cache)))
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(hf_logits(hf, b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).item()
                  for b in validation_batches(data.val, 8, 64, 4)]
    expected = losses[0]  # the check evaluates the first validation batch (run/transition.CHECK_BATCHES)
    assert abs(first["growth"]["val_loss_before"] - expected) <= 1e-5 * expected
    assert abs(first["growth"]["val_loss_after"] - first["growth"]["val_loss_before"]) <= 1e-5
    assert first["val_loss"] < expected  # and it trained from there
