"""Data mixtures and per-source evaluation: the offline bilingual and code sources, the
tokenizer's per-source training share, mixture ratios held per stage and across a
resume, per-source loss and bits-per-byte, tokens per source in the ledger; the shipped
`bilingual` and `code_mix` examples, shrunk by overrides, end to end."""
from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest

from orchestrator.budget.ledger import Ledger
from orchestrator.checkpoint.canonical import latest_checkpoint, read_meta
from orchestrator.commands.compose import CommandLine, load
from orchestrator.config.schema import DataConfig, SourceConfig, TokenizerConfig
from orchestrator.data import ByteTokenizer, DataError, iter_documents, new_cursor, next_global_batch, tokens_read
from orchestrator.data.corpus import _docstrings, stdlib_files, stdlib_root
from orchestrator.data.mixture import Schedule, resolve_weights
from orchestrator.data.tokenizer import BpeTokenizer
from orchestrator.run.evaluation import LN2, bits_per_byte, val_sets

from ..conftest import fork_grow, read_summary
from .test_pipeline import make_stream

CJK = re.compile(r"[\u4e00-\u9fff]")


# -- sources ---------------------------------------------------------------------------
def test_people_daily_is_chinese_text_without_its_tags():
    docs = list(iter_documents(SourceConfig(kind="people_daily")))
    text = "".join(t for _, t in docs)
    assert 5_000_000 < len(text.encode()) < 6_000_000  # ~5.5 MB, as ENVIRONMENT.md measures
    assert len(CJK.findall(text)) > 1_000_000
    assert not re.search(r"/[a-zA-Z]{1,3}\s", text)  # no 'word/n  ' part-of-speech tags left
    assert docs[0][1].startswith("迈向充满希望的新世纪")
    assert len({d for d, _ in docs}) == len(docs) > 300  # unique ids: the val split hashes them


def test_stdlib_code_and_prose_are_separate_sources():
    code = [d for d, _ in itertools.islice(iter_documents(SourceConfig(kind="stdlib_code")), 50)]
    assert code == [f"stdlib/{rel}" for rel, _ in stdlib_files()[:50]]
    prose = list(itertools.islice(iter_documents(SourceConfig(kind="stdlib_prose")), 120))
    ids = [d for d, _ in prose]
    assert ids[0].startswith("pydoc/") and ids[-1].startswith("doc/stdlib/")
    assert all(d.startswith(("pydoc/", "doc/stdlib/")) for d in ids)
    assert not any("/test/" in d or "/test_" in d for d in ids)
    json_doc = _docstrings((stdlib_root() / "json" / "__init__.py").read_text())
    assert json_doc.startswith("JSON (JavaScript Object Notation)")
    assert "import json" in json_doc and "\nimport " not in json_doc.split(">>>")[0]  # prose, examples, no code


# -- the tokenizer's training share ------------------------------------------------------
def _two_language_cfg(tmp_path, mix) -> DataConfig:
    """English (the pydoc topics) and Chinese (People's Daily), 60k characters each, as
    JSONL files: one document per line."""
    files = {"en": tmp_path / "en.jsonl", "zh": tmp_path / "zh.jsonl"}
    if not files["en"].exists():
        for (name, path), kind in zip(files.items(), ("stdlib_prose", "people_daily")):
            docs, size = [], 0
            for _, text in iter_documents(SourceConfig(kind=kind)):
                docs.append(json.dumps({"text": text}))
                size += len(text)
                if size > 60000:
                    break
            path.write_text("\n".join(docs) + "\n")
    return DataConfig(tokenizer=TokenizerConfig(kind="bpe", vocab_size=800, train_chars=50000, train_mix=mix),
                      sources={n: SourceConfig(kind="files", paths=[str(p)]) for n, p in files.items()},
                      val_fraction=0.02, cache_dir=str(tmp_path / "cache"))


def test_train_mix_sets_each_sources_share_of_the_bpe(tmp_path):
    from orchestrator.data.dataset import _tokenizer
    from pathlib import Path

    def cjk_tokens(mix):
        tok = _tokenizer(_two_language_cfg(tmp_path, mix), Path(tmp_path / "cache"))
        pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
        return tok, sum(bool(CJK.search(p)) for p in pieces)

    en_tok, en_heavy = cjk_tokens({"en": 0.9, "zh": 0.1})
    zh_tok, zh_heavy = cjk_tokens({"en": 0.1, "zh": 0.9})
    assert en_tok.fingerprint != zh_tok.fingerprint  # the share is part of the tokenizer's key
    assert zh_heavy > 2 * en_heavy > 0, (zh_heavy, en_heavy)  # more Chinese text: more Chinese merges
    only_en = cjk_tokens({"en": 1.0, "zh": 0.0})[1]
    assert only_en == 0  # a zero share: no Chinese text learnt from at all


@pytest.mark.parametrize("tok", [ByteTokenizer(), BpeTokenizer.train(["naïve café 日本語 🐍 def f(x): return x"] * 20, 300)],
                         ids=["byte", "bpe"])
def test_token_bytes_count_the_text_each_id_stands_for(tok):
    text = "naïve café – 日本語 🐍\n\tdef f(x):\n    return x ** 2"
    ids = tok.encode(text)
    table = tok.token_bytes()
    assert table.shape == (tok.vocab_size,) and table[tok.eos_id] == 1
    assert int(table[ids].sum()) == len(text.encode("utf-8"))


# -- ratios ------------------------------------------------------------------------------
def test_ratios_must_sum_to_one_and_name_known_sources():
    names = ["a", "b", "c"]
    assert resolve_weights(names, {"a": 0.7, "b": 0.3 + 1e-9}) == (("a", "b"), (0.7, 0.3 + 1e-9))
    for bad, words in (({"a": 0.7, "b": 0.2}, "must sum to 1, got a 0.7 + b 0.2 = 0.9"),
                       ({"a": 2.0, "c": 1.0}, "must sum to 1"),
                       ({"zzz": 1.0}, "unknown source 'zzz'; sources: a, b, c"),
                       ({"a": 1.5, "b": -0.5}, "finite number >= 0")):
        with pytest.raises(DataError, match=re.escape(words)):
            resolve_weights(names, bad)


def _shares(tokens: dict) -> dict:
    total = sum(tokens.values())
    return {k: v / total for k, v in tokens.items()}


@pytest.mark.parametrize("schedule", ["bilingual", "code_mix"])
def test_shipped_mixtures_hold_within_one_percent_in_every_stage(schedule):
    """The shipped schedules, stage after stage on one cursor as a run reads them: every
    stage's tokens per source are within 1% of its ratios (no training needed: which
    source a sequence comes from is a pure function of its number)."""
    cfg = load(CommandLine(overrides=[f"schedule={schedule}"]))
    streams = {n: None for n in cfg.data.sources}
    sequences = 0
    for stage in cfg.schedule.stages:
        n = stage.tokens // stage.seq_len
        names, weights = resolve_weights(list(streams), stage.mixture)
        counts = np.bincount(Schedule(names, weights).picks(sequences, n), minlength=len(names))
        for k, name in enumerate(names):
            assert abs(counts[k] / n - stage.mixture[name]) <= 0.01, (stage.name, name, counts)
        sequences += n


def test_mixture_and_tokens_per_source_hold_across_a_resume(tmp_path):
    """Read 60 batches straight, and again in two halves with the cursor written to JSON
    and back between them (a checkpoint): the same tokens, the same count per source,
    within one sequence of the ratios."""
    streams = {"en": make_stream(tmp_path, "en", np.arange(0, 5000)),
               "zh": make_stream(tmp_path, "zh", np.arange(10000, 13000))}
    mix, batch, seq = {"en": 0.535, "zh": 0.465}, 8, 16

    def read(cursor, steps, ledger):
        rows = []
        for _ in range(steps):
            tokens, after = next_global_batch(streams, cursor, mix, batch, seq)
            ledger.add_source_tokens("s", tokens_read(cursor, after))
            rows.append(tokens)
            cursor = after
        return rows, cursor

    straight, halves = Ledger(), Ledger()
    a, _ = read(new_cursor(streams), 60, straight)
    b1, mid = read(new_cursor(streams), 25, halves)
    halves = Ledger.from_dict(json.loads(json.dumps(halves.to_dict())))
    b2, _ = read(json.loads(json.dumps(mid)), 35, halves)
    assert all((x == y).all() for x, y in zip(a, b1 + b2))
    got = halves.stage("s").sources
    assert got == straight.stage("s").sources and sum(got.values()) == 60 * batch * seq
    for name, share in _shares(got).items():
        assert abs(got[name] / seq - 60 * batch * mix[name]) < 1
        assert abs(share - mix[name]) <= 0.01
    assert halves.total.sources == got


# -- per-source evaluation -------------------------------------------------------------
def test_val_sets_count_target_tokens_and_bytes(tmp_path):
    streams = {"b": make_stream(tmp_path, "b", np.arange(256) % 200),
               "a": make_stream(tmp_path, "a", np.full(100, 256))}  # all eos: one byte each
    table = np.arange(257) % 3 + 1  # a made-up byte length per id
    sets = val_sets(streams, table, 4, 8, 2)
    assert list(sets) == ["a", "b"]
    b = sets["b"]
    assert b.tokens == 2 * 4 * 8 and len(b.batches) == 2
    assert b.bytes == sum(int(table[x[:, 1:].numpy()].sum()) for x in b.batches)
    assert sets["a"].bytes == sets["a"].tokens * table[256]
    assert bits_per_byte(2.0, 100, 50) == pytest.approx(4.0 / LN2)


# -- the shipped examples, shrunk -------------------------------------------------------
def _tiny(stages: int, steps: list[int]) -> list[str]:
    """Overrides that shrink a shipped example to seconds: 8 x 64 batches, few steps."""
    out = ["train.eval_every_steps=8", "train.eval_batches=2", "checkpoint.every_steps=4"]
    for i in range(stages):
        out += [f"schedule.stages.{i}.batch_size=8", f"schedule.stages.{i}.seq_len=64",
                f"schedule.stages.{i}.tokens={steps[i] * 8 * 64}", f"schedule.stages.{i}.lr.warmup_steps=2"]
        if i:
            out.append(f"schedule.stages.{i}.growth.ramp_steps=4")
    return out


BILINGUAL_TINY = _tiny(3, [16, 16, 16]) + ["data.tokenizer.vocab_size=1024", "data.tokenizer.train_chars=300000"]


def _check_sources(summary: dict, mix: dict) -> None:
    for st in summary["stages"]:
        got = st["tokens_by_source"]
        assert set(got) == set(mix) and sum(got.values()) == st["tokens"]
        for name, share in _shares(got).items():
            assert abs(share - mix[name]) <= 0.01, (st["name"], got)
        val = st["val_by_source"]
        assert set(val) == set(mix)
        # equal tokens per source in validation: val/loss is the mean of the sources'
        assert st["val_loss"] == pytest.approx(sum(v["loss"] for v in val.values()) / len(val))
        assert min(v["bpb"] for v in val.values()) <= st["val_bpb"] <= max(v["bpb"] for v in val.values())
    totals = summary["totals"]["tokens_by_source"]
    assert totals == {n: sum(st["tokens_by_source"][n] for st in summary["stages"]) for n in mix}


@pytest.mark.slow
def test_bilingual_example_per_language_losses_and_ratio_across_a_resume(tmp_path, data_cache):
    """The bilingual example, shrunk: stopped by a token cap in the middle of stage 2,
    resumed: English : Chinese within 1% of 53.5 : 46.5 in every stage, per-language loss
    and bits-per-byte in summary.json, MLflow and the ledger, growth still exact."""
    run_dir = tmp_path / "run"
    args = ["tracking=sqlite", f"hydra.run.dir={run_dir}", *BILINGUAL_TINY]
    cap = (16 + 6) * 8 * 64
    first = fork_grow(tmp_path, *args, f"budget.max_tokens={cap}", cache=data_cache, schedule="bilingual")
    assert "budget.max_tokens" in first.stdout
    stopped = read_meta(latest_checkpoint(run_dir))
    assert stopped["stage_name"] == "wide" and stopped["step"] == 6
    fork_grow(tmp_path, *args, cache=data_cache, schedule="bilingual")
    s = read_summary(run_dir)
    assert s["status"] == "complete"
    mix = {"english": 0.535, "chinese": 0.465}
    _check_sources(s, mix)
    # every sequence counted once over the resume: the counts a pure read of the stream gives
    n = [16 * 8, 16 * 8, 16 * 8]
    picks = Schedule(("chinese", "english"), (0.465, 0.535)).picks(0, sum(n))
    assert s["stages"][1]["tokens_by_source"]["chinese"] == 64 * int((picks[n[0]:n[0] + n[1]] == 0).sum())
    for st in s["stages"][1:]:
        g = st["growth"]
        assert abs(g["val_loss_after"] - g["val_loss_before"]) <= 1e-5
    last = read_meta(latest_checkpoint(run_dir))
    assert last["ledger"]["deep"]["sources"] == s["stages"][2]["tokens_by_source"]
    val = s["stages"][-1]["val_by_source"]
    assert all(math.isfinite(v["loss"]) and 0 < v["bpb"] < 10 for v in val.values())
    from mlflow.tracking import MlflowClient
    client = MlflowClient(s["mlflow"]["tracking_uri"])
    child = client.get_run(s["stages"][-1]["mlflow_run_id"]).data.metrics
    for key in ("val/english/loss", "val/english/bpb", "val/chinese/loss", "val/chinese/bpb", "val/bpb"):
        assert key in child, key
    assert child["val/chinese/bpb"] == pytest.approx(val["chinese"]["bpb"])
    parent = client.get_run(s["mlflow"]["parent_run_id"]).data.metrics
    assert "val/chinese/loss" in parent
    assert (run_dir / "loss.png").stat().st_size > 10_000


@pytest.mark.slow
def test_code_mix_example_reads_seven_to_three_with_per_source_losses(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    fork_grow(tmp_path, "tracking=off", f"hydra.run.dir={run_dir}", *_tiny(2, [16, 16]),
              cache=data_cache, schedule="code_mix")
    s = read_summary(run_dir)
    _check_sources(s, {"text": 0.7, "python": 0.3})
    val = s["stages"][-1]["val_by_source"]
    # a byte tokenizer: bits per byte is the loss in bits
    for v in val.values():
        assert v["bpb"] == pytest.approx(v["loss"] / LN2)
    assert abs(s["stages"][1]["growth"]["val_loss_after"] - s["stages"][1]["growth"]["val_loss_before"]) <= 1e-5
