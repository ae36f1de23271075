"""A published Mixtral (here: randomly built, saved) continues as a mixture of experts:
`grow import-hf` prints the `grow run` overrides that state it (its experts included), and a
run from them starts from exactly its weights: the first step's loss is transformers' own on
the same batch. Without the mixture's overrides, stage 1 is refused in one line."""
from __future__ import annotations

import contextlib
import io
import json
import shlex

import pytest
import torch

transformers = pytest.importorskip("transformers")

from orchestrator.commands.hf import import_command  # noqa: E402
from orchestrator.config.parse import parse  # noqa: E402
from orchestrator.data import new_cursor, next_global_batch, prepare_data  # noqa: E402

from ..conftest import fork_grow, grow_in_process, read_summary  # noqa: E402

pytestmark = pytest.mark.slow
ONE_STAGE = ("schedule.stages=[{name:continue,shape:{layers:1,hidden:32,ffn:64,heads:2,kv_heads:1},tokens:1536,"
             "batch_size:8,seq_len:64,lr:{peak:1.0e-3,warmup_steps:1,min:1.0e-4,decay:cosine},growth:null}]")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(root, the Mixtral, its checkpoint, the printed `grow run` arguments)."""
    root = tmp_path_factory.mktemp("continue-mixtral")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, router_aux_loss_coef=0.02, max_position_embeddings=128,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # far from the small init, so a wrong expert or routing shows in the loss
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(root / "hf")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert import_command([f"src={root / 'hf'}", f"out={root / 'ckpt'}"]) == 0
    command = shlex.split(printed.getvalue().splitlines()[-1])
    assert command[:2] == ["grow", "run"]
    return root, hf, root / "ckpt", command[2:]


def test_import_prints_the_mixture(imported):
    *_, printed = imported
    assert "schedule.stages.0={moe: {experts: 4, top_k: 2, aux_loss_coef: 0.02, capacity_factor: null}}" in printed
    assert "schedule.stages.0.shape={layers: 2, hidden: 32, ffn: 48, heads: 2, kv_heads: 1}" in printed


def test_the_run_continues_the_mixture_from_transformers_loss(imported, data_cache):
    root, hf, _, printed = imported
    run_dir = root / "run"
    fork_grow(root, f"hydra.run.dir={run_dir}", "tracking=off", ONE_STAGE, *printed, cache=data_cache)
    (stage,) = read_summary(run_dir)["stages"]
    assert stage["growth"] is None and stage["experts"] == 4 and stage["routing"]["steps"] == 3
    cfg = parse(json.loads((run_dir / "config.json").read_text()))
    data = prepare_data(cfg.data)
    first = cfg.schedule.stages[0]
    batch, _ = next_global_batch(data.train, new_cursor(sorted(data.train)), first.mixture or None,
                                 first.batch_size, first.seq_len)
    with torch.no_grad():
        expected = hf(input_ids=batch, labels=batch).loss.item()  # no router loss: output_router_logits is off
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert (logged["stage"], logged["step"]) == ("continue", 1)
    assert abs(logged["train/loss"] - expected) <= 1e-5 * expected


def test_a_dense_stage_1_is_refused_for_a_mixture(imported, data_cache, tmp_path, capsys):
    root, _, ckpt, printed = imported
    dense = [a for a in printed if not a.startswith("schedule.stages.0={moe:")]
    code = grow_in_process("run", "schedule=tiny", f"data.cache_dir={data_cache}", f"hydra.run.dir={tmp_path / 'r'}",
                           "tracking=off", ONE_STAGE, *dense)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "experts=4 top_k=2" in err and "'schedule.stages.0={moe: {experts: 4, top_k: 2" in err
    assert not (tmp_path / "r").exists()
