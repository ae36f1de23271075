"""Megatron indexed datasets as sources (`kind: indexed`) and as the token cache's format:
read back token for token, split by document, blended and resumed exactly, trained on by a
real `grow run`, and every broken or foreign dataset refused before training, in one line.

Every dataset here is a real .bin/.idx pair written by megatron-core's IndexedDatasetBuilder."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from orchestrator.config.schema import DataConfig, SourceConfig
from orchestrator.data import ByteTokenizer, DataError, iter_documents, is_validation, new_cursor, next_global_batch
from orchestrator.data import prepare_data, rank_slice, tokens_read
from orchestrator.data.corpus import stdlib_files
from orchestrator.data.dataset import FORMAT
from orchestrator.data.indexed import check_prefix, indexed_splits, validation_mask

from ..conftest import fork_grow, grow_in_process
from .indexed_files import write_dataset

EOS = ByteTokenizer.eos_id


def _random_docs(rng, n, vocab=250, longest=40):
    return [rng.integers(0, vocab, rng.integers(1, longest)).tolist() + [EOS] for _ in range(n)]


def _flat(docs) -> list[int]:
    return [t for d in docs for t in (np.concatenate(d).tolist() if isinstance(d[0], list) else d)]


def _byte_docs(n: int, chars: int = 1500) -> list[list[int]]:
    """The first `chars` of n standard-library files, byte-tokenized, each ending with eos."""
    tok = ByteTokenizer()
    return [tok.encode(path.read_text(encoding="utf-8", errors="replace")[:chars]) + [EOS]
            for _, path in stdlib_files()[:n]]


# -- reading ---------------------------------------------------------------------------
def test_read_back_token_for_token_split_by_document(tmp_path):
    """Two prefixes in one source (the second with documents of several sequences, as
    --split-sentences writes): train and val are exactly their documents in order, every
    document in one of them, chosen per (file name, document index); windows anywhere,
    across documents, prefixes and the end, are the concatenation's."""
    rng = np.random.default_rng(0)
    a_docs = _random_docs(rng, 400)
    b_docs = [[d[:len(d) // 2] + [7], d[len(d) // 2:]] for d in _random_docs(rng, 150)]  # 2 sequences each
    a = write_dataset(tmp_path / "a_text_document", a_docs)
    b = write_dataset(tmp_path / "b_text_document", b_docs)
    train, val, meta = indexed_splits("src", [a, b], 0.2, EOS)
    expect = {"train": [], "val": []}
    for name, docs in (("a_text_document", a_docs), ("b_text_document", b_docs)):
        for doc, in_val in zip(docs, validation_mask(name, len(docs), 0.2)):
            expect["val" if in_val else "train"] += _flat([doc])
    assert train.window(0, len(train)).tolist() == expect["train"]
    assert val.window(0, len(val)).tolist() == expect["val"]
    assert meta["train_docs"] + meta["val_docs"] == 550 and 0.13 < meta["val_docs"] / 550 < 0.27
    assert len(train) + len(val) == len(_flat(a_docs)) + len(_flat(b_docs)) == meta["train_tokens"] + meta["val_tokens"]
    ref = np.array(expect["train"])
    for offset in [0, 1, 36, len(ref) // 2, len(ref) - 5, 3 * len(ref) + 11]:
        assert np.array_equal(train.window(offset, 300), ref[(offset + np.arange(300)) % len(ref)])
    assert np.array_equal(train.window(7, 3 * len(ref)), ref[(7 + np.arange(3 * len(ref))) % len(ref)])
    # the rule is fixed (a resume depends on it) and follows the file name, not the directory
    assert validation_mask("x_text_document", 64, 0.25).nonzero()[0].tolist() == [
        8, 9, 13, 14, 19, 20, 21, 24, 38, 40, 43, 47, 50, 55, 59, 60, 63]
    moved = tmp_path / "moved"
    moved.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(a + ext, moved / f"a_text_document{ext}")
    again, _, _ = indexed_splits("src", [str(moved / "a_text_document"), b], 0.2)
    assert np.array_equal(again.window(0, len(again)), train.window(0, len(train)))


def test_validation_is_never_empty_and_train_must_exist(tmp_path):
    docs = [[1, 2, EOS], [3, EOS], [4, 5, 6, EOS]]
    train, val, meta = indexed_splits("s", [write_dataset(tmp_path / "t", docs)], 1e-12)
    assert val.window(0, len(val)).tolist() == [4, 5, 6, EOS] and (meta["train_docs"], meta["val_docs"]) == (2, 1)
    assert train.window(0, len(train)).tolist() == [1, 2, EOS, 3, EOS]
    with pytest.raises(DataError, match="'s': no training documents"):
        indexed_splits("s", [write_dataset(tmp_path / "one", docs[:1])], 1e-12)


def test_two_sources_blend_within_one_percent_and_exactly_across_a_resume_and_dp(tmp_path):
    """Sources weighed 0.7 : 0.3 over a stage of 200 batches get their tokens within 1%;
    reading in two halves with the cursor through JSON (a checkpoint), and slicing each
    global batch for dp 2 then 4, gives the same rows as one straight read."""
    rng = np.random.default_rng(1)
    streams = {}
    for name, base in (("web", 0), ("code", 1000)):
        docs = [(np.array(d) + base).tolist() for d in _random_docs(rng, 300)]
        streams[name] = indexed_splits(name, [write_dataset(tmp_path / name, docs)], 0.05)[0]
    mix, batch, seq = {"web": 0.7, "code": 0.3}, 8, 32

    def read(cursor, steps):
        rows, got = [], {"web": 0, "code": 0}
        for _ in range(steps):
            tokens, after = next_global_batch(streams, cursor, mix, batch, seq)
            for name, n in tokens_read(cursor, after).items():
                got[name] += n
            rows.append(tokens)
            cursor = after
        return rows, got, cursor

    straight, got, _ = read(new_cursor(streams), 200)
    for name, share in mix.items():
        assert abs(got[name] / (200 * batch * seq) - share) <= 0.01
    first, _, mid = read(new_cursor(streams), 90)
    second, _, _ = read(json.loads(json.dumps(mid)), 110)
    assert all((x == y).all() for x, y in zip(straight, first + second))
    for rows, dp in ((first, 2), (second, 4)):  # the data parallelism changed at the resume
        for tokens in rows:
            assert (np.concatenate([rank_slice(tokens, r, dp) for r in range(dp)]) == tokens.numpy()).all()


# -- the token cache is indexed datasets ---------------------------------------------------
def test_the_cache_is_megatron_indexed_datasets_one_document_per_sequence(tmp_path):
    """What Megatron's own reader sees in the cache: each split's sequences are its documents,
    [ids] + eos, in corpus order."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(20):
        (d / f"doc{i:02d}.txt").write_text(f"document {i}: " + "text " * i)
    src = SourceConfig(kind="files", paths=[str(d)])
    cfg = DataConfig(sources={"mine": src}, val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg)
    out, tok = data.dirs["mine"], data.tokenizer
    assert data.meta["mine"]["format"] == FORMAT == 2
    for split in ("train", "val"):
        ds = IndexedDataset(str(out / split))
        docs = [tok.encode(t) + [EOS] for i, t in iter_documents(src) if is_validation(i, 0.3) == (split == "val")]
        assert [ds[k].tolist() for k in range(len(ds))] == docs
        assert ds.index.dtype == np.uint16 and len(ds.document_indices) == len(docs) + 1
    assert not list(out.glob("*.tmp")) and {p.name for p in out.iterdir()} == {
        "train.bin", "train.idx", "train.json", "val.bin", "val.idx", "val.json", "meta.json"}


# -- a real run ------------------------------------------------------------------------------
def test_grow_run_trains_on_an_indexed_source_and_resumes_exactly(tmp_path, data_cache):
    """`grow run data=indexed` on a byte-tokenized corpus with `grow prepare`'s metadata:
    stopped by a token cap mid-stage and resumed, every step's loss is the straight run's."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    prefix = write_dataset(corpus / "stdlib_text_document", _byte_docs(150))
    tok = ByteTokenizer()
    (corpus / "stdlib_text_document.json").write_text(json.dumps({
        "tokenizer": {"kind": "byte", "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "eos_id": EOS, "bos_id": None}, "documents": 150, "tokens": 0}))
    common = ("tracking=off", "data=indexed", "data.tokenizer.kind=byte", "data.tokenizer.path=null",
              f"data.sources.corpus.paths=[{prefix}]", "run.only_stage=s1", "schedule.stages.0.tokens=6144",
              "train.log_every_steps=1", "train.eval_batches=2", "train.eval_every_steps=6")

    def losses(run_dir):
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}

    fork_grow(tmp_path, *common, f"hydra.run.dir={tmp_path / 'straight'}", cache=data_cache)
    fork_grow(tmp_path, *common, f"hydra.run.dir={tmp_path / 'resumed'}", "budget.max_tokens=3072",
              cache=data_cache)
    assert sorted(losses(tmp_path / "resumed")) == list(range(1, 7))
    fork_grow(tmp_path, *common, f"hydra.run.dir={tmp_path / 'resumed'}", "budget.max_tokens=6144",
              cache=data_cache)
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 13)) and straight[12] < straight[1]
    assert losses(tmp_path / "resumed") == straight


# -- refusals ------------------------------------------------------------------------------
def _args(tmp_path, prefix, *extra) -> list[str]:
    return ["run", "schedule=tiny", "tracking=off", "data=indexed", "data.tokenizer.kind=byte",
            "data.tokenizer.path=null", f"data.sources.corpus.paths=[{prefix}]",
            f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", *extra]


def _refused(capsys, args, key: str, words: str) -> None:
    code = grow_in_process(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.splitlines() == [err] and key in err and words in err, err


def _damage(prefix: str, how: str, tmp_path: Path) -> str:
    if how == "no idx":
        os.unlink(prefix + ".idx")
    elif how == "no bin":
        os.unlink(prefix + ".bin")
    elif how == "truncated":
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 2)
    elif how == "longer":
        with open(prefix + ".bin", "ab") as f:
            f.write(b"\0\0\0\0")
    elif how == "bad header":
        with open(prefix + ".idx", "r+b") as f:
            f.write(b"NOTANIDX!")
    elif how == "other pair":  # another dataset's .idx beside this .bin
        shutil.copy(write_dataset(tmp_path / "other", [[1, 2, 3, EOS]] * 50) + ".idx", prefix + ".idx")
    elif how == "float":
        write_dataset(prefix, [[1.5, 2.0, 256.0]] * 10, dtype=np.float32)
    elif how == "id beyond vocab":
        write_dataset(prefix, [[1, 2, 300, EOS]] * 10)
    elif how == "negative id":
        write_dataset(prefix, [[1, -2, EOS]] * 10, dtype=np.int32)
    elif how == "other tokenizer":
        Path(prefix + ".json").write_text(json.dumps({
            "tokenizer": {"kind": "hf", "fingerprint": "hf-0123", "vocab_size": 50257, "eos_id": 50256,
                          "bos_id": None}, "documents": 10, "tokens": 40}))
    elif how == "bad metadata":
        Path(prefix + ".json").write_text(json.dumps({"documents": 10}))
    return prefix


REFUSALS = [
    ("no idx", "no {p}.idx"), ("no bin", "no {p}.bin"), ("truncated", "{p}.bin is truncated"),
    ("longer", "{p}.bin is longer than its index says"), ("bad header", "{p}.idx: not a Megatron index"),
    ("other pair", "{p}.bin is"), ("float", "stored as float32, not integers"),
    ("id beyond vocab", "token id 300 is outside the tokenizer's 257 ids"),
    ("negative id", "token id -2 is outside"), ("other tokenizer", "its ids are from tokenizer hf hf-0123"),
    ("bad metadata", "not a dataset's metadata (no kind"),
]


@pytest.mark.parametrize("how,words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_broken_or_foreign_datasets_are_refused_before_training(tmp_path, capsys, how, words):
    prefix = _damage(write_dataset(tmp_path / "c_text_document", [[1, 2, 3, EOS]] * 10), how, tmp_path)
    _refused(capsys, _args(tmp_path, prefix), "data.sources.corpus.paths.0", words.format(p=prefix))
    assert not (tmp_path / "run" / "config.json").exists()


def test_tokenizer_and_paths_refused_by_name(tmp_path, capsys):
    prefix = write_dataset(tmp_path / "c_text_document", [[1, 2, 3, EOS]] * 10)
    _refused(capsys, _args(tmp_path, prefix, "data.tokenizer.kind=bpe"), "data.tokenizer.kind",
             "would train a new vocabulary")
    _refused(capsys, ["run", "schedule=tiny", "tracking=off", "data=indexed", "data.tokenizer.kind=byte",
                      "data.tokenizer.path=null", f"hydra.run.dir={tmp_path / 'run'}"],
             "data.sources.corpus.paths", "needs at least one dataset prefix")
    _refused(capsys, ["run", "schedule=tiny", "tracking=off", "data=indexed", f"hydra.run.dir={tmp_path / 'run'}"],
             "data.tokenizer.path", "needs a path")


def test_the_id_scan_is_remembered_per_bin(tmp_path):
    """The max-id scan runs once per (path, size, mtime): a rerun reads the record (shown by
    tampering with it), a touched .bin is scanned again."""
    prefix = write_dataset(tmp_path / "c", [[1, 2, 3, EOS]] * 10)
    cache = tmp_path / "cache"
    check_prefix(prefix, 257, "byte", ByteTokenizer.fingerprint, cache)
    [record] = (cache / "indexed-scan").iterdir()
    assert json.loads(record.read_text())["max"] == EOS
    record.write_text(json.dumps({"min": 0, "max": 999}))
    with pytest.raises(DataError, match="token id 999"):
        check_prefix(prefix, 257, "byte", ByteTokenizer.fingerprint, cache)
    st = os.stat(prefix + ".bin")
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    check_prefix(prefix, 257, "byte", ByteTokenizer.fingerprint, cache)
