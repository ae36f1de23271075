"""Continue pretraining a published model on its own tokenizer, as a user would: a Llama
directory (LlamaForCausalLM + a byte-level BPE tokenizer.json + tokenizer_config.json naming
bos/eos) -> `grow import-hf` -> the `grow run` command it prints, on schedule=continue_hf:
stage 1 at the imported shape, stage 2 grown with msg. The first step's loss is transformers'
own on the same batch; what does not fit is refused in one line before anything runs."""
from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from orchestrator.commands.hf import import_command  # noqa: E402
from orchestrator.config.parse import parse  # noqa: E402
from orchestrator.config.tokenizer_file import hf_vocab_digest  # noqa: E402
from orchestrator.data import new_cursor, next_global_batch, prepare_data  # noqa: E402

from ..conftest import fork_grow, grow_in_process, random_llama, read_summary  # noqa: E402

pytestmark = pytest.mark.slow

UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # Llama 2's: ids 0, 1, 2
SHAPE = dict(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2)
# untied, RoPE theta and RMSNorm eps unlike the run's defaults: each must come from the import
HF_MODEL = dict(tied=False, theta=500000.0, eps=1e-6)
STEPS = ("schedule.stages.{i}.tokens=1536", "schedule.stages.{i}.batch_size=8", "schedule.stages.{i}.seq_len=64",
         "schedule.stages.{i}.lr.warmup_steps=1")  # 3 steps of 8 x 64 per stage
GROWN = "schedule.stages.1.shape={layers: 2, hidden: 128, ffn: 256, heads: 8, kv_heads: 4}"


def _documents() -> list[str]:
    """Short real texts (stdlib docstrings), so the first batch crosses document boundaries."""
    import argparse
    import difflib
    import inspect
    import textwrap
    docs = [inspect.getdoc(obj) for mod in (argparse, difflib, inspect, textwrap)
            for _, obj in inspect.getmembers(mod, inspect.isfunction) if obj.__module__ == mod.__name__]
    return [d for d in docs if d and len(d) > 80]


def _bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _tokenizer_dir(path: Path, texts: list[str], vocab_size: int) -> int:
    path.mkdir()
    tok = _bpe(texts, vocab_size)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}))
    return tok.get_vocab_size()


def _sharpened(model):
    """Weights far from transformers' small init, so attention and logits are far from uniform
    and a wrong position, norm, bos or readout shows in the loss (at std 0.02 every batch's
    loss is ln(vocab) to 1e-4)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(root, model dir, checkpoint, corpus, the `grow run` arguments import-hf printed)."""
    root = tmp_path_factory.mktemp("continue-hf")
    docs = _documents()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model_dir = root / "llama"
    vocab = _tokenizer_dir(model_dir, docs, 500)
    _sharpened(random_llama(vocab=vocab, **SHAPE, max_positions=128, **HF_MODEL)).save_pretrained(model_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert import_command([f"src={model_dir}", f"out={root / 'ckpt'}"]) == 0
    command = shlex.split(printed.getvalue().splitlines()[-1])
    assert command[:2] == ["grow", "run"]
    return root, model_dir, root / "ckpt", corpus, command[2:]


def _data_args(root: Path, corpus: Path) -> list[str]:
    return ["tracking=off", "data=files", f"data.sources.mine.paths=[{corpus}]", "data.val_fraction=0.1",
            "train.eval_batches=2", *(s.format(i=i) for i in (0, 1) for s in STEPS),
            "schedule.stages.1.growth.ramp_steps=2", GROWN]


@pytest.fixture(scope="module")
def run(imported):
    """The printed command on schedule=continue_hf, a second stage grown with msg: its run dir."""
    root, _, _, corpus, printed = imported
    run_dir = root / "run"
    fork_grow(root, f"hydra.run.dir={run_dir}", *printed, *_data_args(root, corpus), cache=root / "cache",
              schedule="continue_hf")
    return run_dir


def test_import_prints_the_model_and_its_tokenizer(imported):
    root, model_dir, ckpt, _, printed = imported
    assert f"data.tokenizer.path={model_dir}" in printed and "data.tokenizer.kind=hf" in printed
    assert {"model.rope_theta=500000.0", "model.norm_eps=1e-06", "model.tie_embeddings=false",
            "model.vocab_size=500"} <= set(printed)
    assert "schedule.stages.0.shape={layers: 2, hidden: 64, ffn: 128, heads: 4, kv_heads: 2}" in printed
    recorded = json.loads((ckpt / "meta.json").read_text())["imported_from"]["tokenizer"]
    assert recorded == {"file": str(model_dir.resolve() / "tokenizer.json"), "ids": 500,
                        "digest": hf_vocab_digest(str(model_dir))}


def test_first_step_loss_is_transformers_loss(run, imported):
    _, model_dir, _, _, _ = imported
    cfg = parse(json.loads((run / "config.json").read_text()))
    data = prepare_data(cfg.data)  # the run's token cache: the same streams
    assert (data.tokenizer.bos_id, data.tokenizer.eos_id) == (1, 2)  # named by tokenizer_config.json
    first = cfg.schedule.stages[0]
    batch, _ = next_global_batch(data.train, new_cursor(sorted(data.train)), first.mixture or None,
                                 first.batch_size, first.seq_len)
    assert (batch == 1).any() and (batch == 2).any()  # the batch crosses document boundaries
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(input_ids=batch, labels=batch).loss.item()
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (logged["stage"], logged["step"]) == ("continue", 1)
    assert abs(logged["train/loss"] - expected) <= 1e-5 * expected


def test_second_stage_grows_the_imported_model(run):
    continued, grown = read_summary(run)["stages"]
    assert continued["growth"] is None  # the imported shape: loaded as it is
    assert grown["growth"]["operator"] == "msg"
    assert abs(grown["growth"]["val_loss_after"] - grown["growth"]["val_loss_before"]) <= 1e-5
    assert grown["steps"] == 3 and grown["complete"]


def _refusal(capsys, tmp_path, imported, *changes: str, drop: str | None = None) -> str:
    """`grow run` with the printed command changed: exit 2, one line, nothing written."""
    root, _, _, corpus, printed = imported
    args = [a for a in printed if drop is None or not a.startswith(drop)]
    run_dir = tmp_path / "run"
    code = grow_in_process("run", "schedule=continue_hf", f"data.cache_dir={root / 'cache'}",
                           f"hydra.run.dir={run_dir}", *args, *_data_args(root, corpus), *changes)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and not run_dir.exists()
    return err


def test_a_tokenizer_of_another_vocabulary_is_refused(capsys, tmp_path, imported):
    root, model_dir, ckpt, _, _ = imported
    other = tmp_path / "other"
    _tokenizer_dir(other, _documents(), 400)
    err = _refusal(capsys, tmp_path, imported, f"data.tokenizer.path={other}")
    assert err.startswith("grow: config error: data.tokenizer.path:")
    assert f"{other} has 400 ids" in err and "(500 ids)" in err and f"data.tokenizer.path={model_dir}" in err


def test_a_tokenizer_of_the_same_size_with_other_ids_is_refused(capsys, tmp_path, imported):
    """Trained on other text to the same 500 ids: the size agrees, the tokens do not."""
    root, model_dir, _, _, _ = imported
    other = tmp_path / "same-size"
    assert _tokenizer_dir(other, [d[::-1] for d in _documents()], 500) == 500
    err = _refusal(capsys, tmp_path, imported, f"data.tokenizer.path={other}")
    assert "not the same tokens at those ids" in err and f"data.tokenizer.path={model_dir}" in err


def test_the_byte_tokenizer_is_refused_for_an_import_with_its_own(capsys, tmp_path, imported):
    _, model_dir, _, _, _ = imported
    err = _refusal(capsys, tmp_path, imported, "data.tokenizer.kind=byte", drop="data.tokenizer.")
    assert "data.tokenizer.kind: byte" in err and f"data.tokenizer.path={model_dir}" in err


def test_a_directory_without_tokenizer_json_is_refused(capsys, tmp_path, imported):
    (tmp_path / "weights-only").mkdir()
    err = _refusal(capsys, tmp_path, imported, f"data.tokenizer.path={tmp_path / 'weights-only'}")
    assert "data.tokenizer.path:" in err and "holds no tokenizer.json" in err


def test_padded_vocabulary_names_the_checkpoint_rows(capsys, tmp_path, imported):
    err = _refusal(capsys, tmp_path, imported, "model.vocab_size=null")  # the tokenizer's 500, padded
    assert "500 vocabulary rows, this run 512" in err and "set model.vocab_size=500" in err


def test_another_architecture_names_every_setting(capsys, tmp_path, imported):
    err = _refusal(capsys, tmp_path, imported, "model.rope_theta=10000", "model.tie_embeddings=true")
    assert err.startswith("grow: config error: init_from:")
    assert "(model.rope_theta=10000.0, model.tie_embeddings=true); set model.rope_theta=500000.0 " \
           "model.tie_embeddings=false" in err


def test_a_first_stage_smaller_than_the_import_is_refused(capsys, tmp_path, imported):
    err = _refusal(capsys, tmp_path, imported, "schedule.stages.0.shape.layers=1")
    assert "schedule.stages.0.shape.layers: cannot shrink (2 -> 1)" in err
    assert "'schedule.stages.0.shape={layers: 2, hidden: 64, ffn: 128, heads: 4, kv_heads: 2}'" in err


def test_import_refuses_a_tokenizer_larger_than_the_model(capsys, tmp_path, imported):
    _, model_dir, _, _, _ = imported
    src = tmp_path / "mismatched"
    _tokenizer_dir(src, _documents(), 600)
    for f in ("config.json", "model.safetensors"):
        (src / f).write_bytes((model_dir / f).read_bytes())
    assert import_command([f"src={src}", f"out={tmp_path / 'ckpt'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "600 ids, more than the model's 500 vocabulary rows" in err
    assert not (tmp_path / "ckpt").exists()


def test_a_head_dim_other_than_hidden_over_heads_is_refused(capsys, tmp_path, imported):
    """import-hf takes any head_dim, but a run's model has head_dim = hidden / heads."""
    _, model_dir, _, _, _ = imported
    src = tmp_path / "wide-heads"
    src.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((model_dir / f).read_bytes())
    random_llama(vocab=500, **SHAPE, head_dim=32).save_pretrained(src)
    assert import_command([f"src={src}", f"out={tmp_path / 'ckpt'}"]) == 0
    capsys.readouterr()
    err = _refusal(capsys, tmp_path, imported, f"init_from={tmp_path / 'ckpt'}", f"data.tokenizer.path={src}")
    assert "has head_dim=32, not hidden / heads = 16" in err
