"""The data pipeline: corpus order and split, tokenizers, the token cache, and the
cursor-addressed read order that resumes and data parallelism depend on.

Everything runs on real files (tmp_path or the interpreter's own standard library) and
real tokenizers; the embedded corpus is prepared once per session."""
import hashlib
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from orchestrator.config.schema import DataConfig, SourceConfig, TokenizerConfig
from orchestrator.data import (BpeTokenizer, ByteTokenizer, DataError, TokenStream, is_validation,
                               iter_documents, new_cursor, next_global_batch, prepare_data, rank_slice,
                               validation_batches)
from orchestrator.data.corpus import stdlib_files
from orchestrator.data.batches import shuffled_start
from orchestrator.data.mixture import Schedule
from orchestrator.data.tokenizer import build_tokenizer, tokenizer_path

from .indexed_files import chunked, write_dataset

REPO = Path(__file__).resolve().parents[2]
UNICODE = "naïve café – 日本語 🐍\n\tdef f(x):\n    return x ** 2  # ok\r\n"


# -- helpers ---------------------------------------------------------------------------
def stdlib_texts(*rels):
    paths = dict(stdlib_files())
    return [paths[r].read_text(encoding="utf-8") for r in rels]


def write_corpus(root: Path, n_txt=30, n_jsonl=25) -> Path:
    """A directory of .txt files, a .jsonl file, and a file the glob must skip."""
    d = root / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(n_txt):
        (d / ("sub" if i % 3 == 0 else ".") / f"doc{i:02d}.txt").write_text(
            f"text document {i} – {'é' * (i % 5)}\n" * (i + 1), encoding="utf-8")
    with open(d / "lines.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_jsonl):
            f.write(json.dumps({"text": f"jsonl line {i} ünïcödé " * (i % 4 + 1), "id": i}) + "\n")
        f.write("\n")  # a trailing blank line is not a document
    (d / "notes.md").write_text("ignored by the glob")
    return d


def files_cfg(tmp_path, paths, glob="*", val_fraction=0.3, tokenizer=None, **src):
    return DataConfig(tokenizer=tokenizer or TokenizerConfig(),
                      sources={"mine": SourceConfig(kind="files", paths=[str(p) for p in paths], glob=glob, **src)},
                      val_fraction=val_fraction, cache_dir=str(tmp_path / "cache"))


def make_stream(tmp_path, name, tokens) -> TokenStream:
    """An indexed dataset of `tokens` in documents of a few sizes, read whole."""
    return TokenStream.whole(write_dataset(tmp_path / name, chunked(tokens)), name)


@pytest.fixture
def streams(tmp_path):
    """Three sources whose token values say which source and offset they came from."""
    return {"a": make_stream(tmp_path, "a", np.arange(0, 1000)),
            "b": make_stream(tmp_path, "b", np.arange(10000, 10777)),
            "c": make_stream(tmp_path, "c", np.arange(20000, 20500))}


def source_of(tokens: torch.Tensor) -> list[str]:
    return ["abc"[int(row[0]) // 10000] for row in tokens]


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    cfg = DataConfig(sources={"stdlib": SourceConfig(kind="embedded")}, val_fraction=0.02,
                     cache_dir=str(tmp_path_factory.mktemp("embedded-cache")))
    return cfg, prepare_data(cfg)


# -- tokenizers ------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8")) and max(ids) < 256
    assert tok.encode_array(UNICODE).tolist() == ids
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids + [tok.eos_id] + ids) == UNICODE * 2  # eos is a boundary, not text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    with pytest.raises(ValueError):
        tok.decode([257])


def test_bpe_trains_round_trips_and_is_cached(tmp_path):
    cfg = TokenizerConfig(kind="bpe", vocab_size=300, train_chars=60_000)
    texts = stdlib_texts("json/decoder.py", "json/encoder.py", "textwrap.py")
    tok = build_tokenizer(cfg, lambda: iter(texts), tmp_path, content_key="k1")
    assert isinstance(tok, BpeTokenizer) and 257 < tok.vocab_size <= 300
    assert tok.decode([tok.eos_id]) == ""
    for s in (UNICODE, texts[0][:3000], ""):
        assert tok.decode(tok.encode(s)) == s
    assert all(0 <= i < tok.vocab_size for i in tok.encode(UNICODE))
    assert len(tok.encode(texts[1])) < 0.8 * len(texts[1].encode())  # merges were learned

    def must_not_train():
        raise AssertionError("a cached tokenizer was retrained")

    again = build_tokenizer(cfg, must_not_train, tmp_path, content_key="k1")
    assert again.fingerprint == tok.fingerprint and again.encode(UNICODE) == tok.encode(UNICODE)
    assert tokenizer_path(cfg, tmp_path, "k1").exists()
    other = build_tokenizer(cfg, lambda: iter(texts[:1]), tmp_path, content_key="k2")
    assert other.fingerprint != tok.fingerprint  # other content, other cache entry


def test_bpe_reads_only_train_chars(tmp_path):
    cfg = TokenizerConfig(kind="bpe", vocab_size=300, train_chars=5_000)

    def texts():
        yield "abc def ghi " * 500  # 6000 characters: enough on its own
        raise AssertionError("read past train_chars")

    tok = build_tokenizer(cfg, texts, tmp_path)
    assert tok.decode(tok.encode("abc def")) == "abc def"


def test_build_tokenizer_rejects_bad_config(tmp_path):
    with pytest.raises(DataError, match="kind"):
        build_tokenizer(TokenizerConfig(kind="word"), lambda: [], tmp_path)
    with pytest.raises(DataError, match="no text"):
        build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), lambda: [], tmp_path)


# -- corpus ----------------------------------------------------------------------------
def test_embedded_corpus_is_deterministic_and_complete():
    first = [doc_id for doc_id, _ in iter_documents(SourceConfig(kind="embedded"))]
    second = [doc_id for doc_id, _ in iter_documents(SourceConfig(kind="embedded"))]
    assert first == second and len(set(first)) == len(first)
    stdlib = [d for d in first if d.startswith("stdlib/")]
    pydoc = [d for d in first if d.startswith("pydoc/")]
    assert first == stdlib + pydoc  # stdlib first, then pydoc topics
    assert stdlib == sorted(stdlib) and pydoc == sorted(pydoc)
    assert {"stdlib/os.py", "stdlib/json/decoder.py", "pydoc/assert"} <= set(first)
    assert not any("site-packages" in d or "__pycache__" in d for d in first)
    assert len(stdlib) > 500 and len(pydoc) > 50


def test_is_validation_is_stable_and_near_the_fraction():
    # Pinned: these must not change between versions, or every cache and split would.
    assert [is_validation(f"doc-{i}", 0.5) for i in range(8)] == [False, True, True, False, True, False, False, False]
    assert is_validation("stdlib/os.py", 0.5) and not is_validation("pydoc/assert", 0.5)
    ids = [f"file-{i}.txt" for i in range(20_000)]
    share = sum(is_validation(d, 0.1) for d in ids) / len(ids)
    assert 0.09 < share < 0.11
    # Monotone in the fraction: a larger val split only adds documents.
    assert all(is_validation(d, 0.2) for d in ids if is_validation(d, 0.1))
    assert not any(is_validation(d, 0.0) for d in ids[:1000])


def test_files_corpus_order_formats_and_glob(tmp_path):
    d = write_corpus(tmp_path, n_txt=4, n_jsonl=3)
    src = SourceConfig(kind="files", paths=[str(d)], glob="*.*l")  # .jsonl only
    assert [i for i, _ in iter_documents(src)] == [f"{d}/lines.jsonl:{n}" for n in (1, 2, 3)]
    src = SourceConfig(kind="files", paths=[str(d / "sub"), str(d)], glob="*.txt")
    ids = [i for i, _ in iter_documents(src)]
    assert ids[:2] == [f"{d}/sub/doc00.txt", f"{d}/sub/doc03.txt"]  # config order, then sorted
    assert ids[2:] == [f"{d}/doc01.txt", f"{d}/doc02.txt", f"{d}/sub/doc00.txt", f"{d}/sub/doc03.txt"]
    texts = dict(iter_documents(SourceConfig(kind="files", paths=[str(d / "doc02.txt")])))
    assert texts == {str(d / "doc02.txt"): (d / "doc02.txt").read_text(encoding="utf-8")}
    forced = SourceConfig(kind="files", paths=[str(d / "lines.jsonl")], format="text")
    assert len(list(iter_documents(forced))) == 1


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a.txt").write_text("hello")
    assert list(iter_documents(SourceConfig(kind="files", paths=["~/a.txt"]))) == [("~/a.txt", "hello")]


@pytest.mark.parametrize("case", ["missing", "no_match", "bad_utf8", "bad_utf8_jsonl", "no_key", "bad_json"])
def test_bad_files_raise_clear_errors(tmp_path, case):
    d = tmp_path / "in"
    d.mkdir()
    (d / "ok.txt").write_text("fine")
    path, glob, expect = d, "*", None
    if case == "missing":
        path, expect = tmp_path / "nope", "nope: no such file"
    elif case == "no_match":
        glob, expect = "*.parquet", "no files match glob '\\*.parquet'"
    elif case == "bad_utf8":
        (d / "latin1.txt").write_bytes("abc caf\xe9".encode("latin-1"))
        expect = "latin1.txt: not valid UTF-8 at byte 7"
    elif case == "bad_utf8_jsonl":
        (d / "x.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff"}\n')
        expect = "x.jsonl: not valid UTF-8 at byte 38"  # offset in the file, not the line
    elif case == "no_key":
        (d / "x.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
        expect = "x.jsonl:2: no key 'text'"
    elif case == "bad_json":
        (d / "x.jsonl").write_text('{"text": "a"}\n\n{"text": oops}\n')
        expect = "x.jsonl:3: not valid JSON"
    cfg = files_cfg(tmp_path, [path], glob=glob)
    with pytest.raises(DataError, match=expect) as info:
        prepare_data(cfg)
    assert "\n" not in str(info.value)
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []  # no temp or half files stay behind


# -- prepare_data ----------------------------------------------------------------------
def test_embedded_prepare_then_reuse(embedded):
    cfg, data = embedded
    meta = data.meta["stdlib"]
    assert data.built == {"stdlib": True}
    assert len(data.train["stdlib"]) == meta["train_tokens"] > 20_000_000
    assert len(data.val["stdlib"]) == meta["val_tokens"] > 100_000
    assert 0.005 < meta["val_docs"] / (meta["val_docs"] + meta["train_docs"]) < 0.05
    assert meta["dtype"] == "uint16" and data.train["stdlib"].parts[0].ds.index.dtype == np.uint16
    assert (data.dirs["stdlib"] / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert int(data.train["stdlib"].window(len(data.train["stdlib"]) - 1, 1)[0]) == 256  # ends with eos
    files = sorted(data.dirs["stdlib"].iterdir())
    before = [(f.name, f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    again = prepare_data(cfg)
    assert again.built == {"stdlib": False} and again.meta["stdlib"] == json.loads(
        (data.dirs["stdlib"] / "meta.json").read_text())
    assert np.array_equal(again.train["stdlib"].window(12345, 1000), data.train["stdlib"].window(12345, 1000))
    # reused untouched: no file of the cache was written again (nothing was tokenized)
    assert [(f.name, f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(data.dirs["stdlib"].iterdir())] == before


def test_token_files_are_the_documents_in_order(tmp_path):
    """Each split is exactly its documents' tokens + eos, in corpus order: no document is
    in both splits or lost, whatever the split."""
    d = write_corpus(tmp_path)
    cfg = files_cfg(tmp_path, [d], glob="*.*[lt]", val_fraction=0.3)
    data = prepare_data(cfg)
    tok = data.tokenizer
    expect = {"train": [], "val": []}
    for doc_id, text in iter_documents(cfg.sources["mine"]):
        expect["val" if is_validation(doc_id, 0.3) else "train"] += tok.encode(text) + [tok.eos_id]
    for split, stream in (("train", data.train["mine"]), ("val", data.val["mine"])):
        assert stream.window(0, len(stream)).tolist() == expect[split]
    meta = data.meta["mine"]
    assert meta["train_docs"] + meta["val_docs"] == 55 and meta["val_docs"] > 5
    assert "ignored by the glob" not in tok.decode(expect["train"] + expect["val"])


def test_cache_invalidates_on_change_and_recovers_from_a_killed_build(tmp_path):
    # 12 documents: with 5, the val_fraction=0.5 split below put all of them in val once in 32
    # (document ids hash the path), leaving no training documents
    d = write_corpus(tmp_path, n_txt=12, n_jsonl=0)
    cfg = files_cfg(tmp_path, [d], glob="*.txt")
    first = prepare_data(cfg)
    out = first.dirs["mine"]
    assert prepare_data(cfg).built == {"mine": False}
    # A preparation killed before meta.json: the files without it are not trusted.
    (out / "meta.json").unlink()
    assert prepare_data(cfg).built == {"mine": True}
    # A damaged token file (size no longer matches meta.json) is rebuilt too.
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    rebuilt = prepare_data(cfg)
    assert rebuilt.built == {"mine": True} and len(rebuilt.train["mine"]) == len(first.train["mine"])
    # Changed content gets a new key; the old directory is left alone.
    (d / "doc01.txt").write_text("changed text, longer than before " * 20)
    changed = prepare_data(cfg)
    assert changed.built == {"mine": True} and changed.dirs["mine"] != out
    assert (out / "meta.json").exists()
    # The split is part of the key.
    cfg.val_fraction = 0.5
    assert prepare_data(cfg).dirs["mine"] not in (out, changed.dirs["mine"])


def test_concurrent_preparers_agree(tmp_path):
    """Preparers started at the same instant on the same key all succeed and leave the
    same files a lone preparer writes (each writes its own temp files, then renames)."""
    d = write_corpus(tmp_path, n_txt=60, n_jsonl=30_000)
    cfg = files_cfg(tmp_path, [d])
    go = tmp_path / "go"
    script = (f"import os, time, hashlib\nfrom orchestrator.data import prepare_data\n"
              f"from orchestrator.config.schema import *\n"
              f"cfg = DataConfig(sources={{'mine': SourceConfig(kind='files', paths=[{str(d)!r}])}}, "
              f"val_fraction=0.3, cache_dir={cfg.cache_dir!r})\n"
              f"open({str(tmp_path)!r} + f'/ready-{{os.getpid()}}', 'w').close()\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
              f"d = prepare_data(cfg)\n"
              f"print(*(hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.dirs['mine'].glob('*.bin'))))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and len(set(outs)) == 1
    data = prepare_data(cfg)
    assert data.built == {"mine": False}
    cfg.cache_dir = str(tmp_path / "alone")
    alone = prepare_data(cfg)
    assert outs[0].split() == [hashlib.sha256(p.read_bytes()).hexdigest()
                               for p in sorted(alone.dirs["mine"].glob("*.bin"))]
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_val_is_never_empty_and_train_must_exist(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "a.txt").write_text("first")
    (d / "b.txt").write_text("second")
    data = prepare_data(files_cfg(tmp_path, [d], val_fraction=1e-12))
    assert (data.meta["mine"]["train_docs"], data.meta["mine"]["val_docs"]) == (1, 1)
    tok = data.tokenizer
    assert tok.decode(data.val["mine"].window(0, len(data.val["mine"])).tolist()) == "second"
    assert tok.decode(data.train["mine"].window(0, len(data.train["mine"])).tolist()) == "first"
    (d / "b.txt").unlink()
    with pytest.raises(DataError, match="'mine': no training documents"):
        prepare_data(files_cfg(tmp_path, [d], val_fraction=1e-12))


def test_prepare_with_bpe(tmp_path):
    d = write_corpus(tmp_path)
    bpe = TokenizerConfig(kind="bpe", vocab_size=300, train_chars=20_000)
    cfg = files_cfg(tmp_path, [d], tokenizer=bpe)
    cfg.sources["more"] = SourceConfig(kind="files", paths=[str(d / "lines.jsonl")])
    data = prepare_data(cfg, ["more"])
    assert set(data.train) == {"more"} and data.built == {"more": True}
    assert isinstance(data.tokenizer, BpeTokenizer) and data.meta["more"]["dtype"] == "uint16"
    docs = [t for i, t in iter_documents(cfg.sources["more"]) if not is_validation(i, cfg.val_fraction)]
    stream = data.train["more"]
    assert data.tokenizer.decode(stream.window(0, len(stream)).tolist()) == "".join(docs)
    both = prepare_data(cfg)  # the tokenizer learnt from all sources, so it is the same one
    assert both.tokenizer.fingerprint == data.tokenizer.fingerprint
    assert both.built == {"mine": True, "more": False}
    with pytest.raises(DataError, match="unknown source 'nope'"):
        prepare_data(cfg, ["nope"])


# -- batches ---------------------------------------------------------------------------
def test_resume_from_json_cursor_reads_the_same_stream(streams):
    mix = {"a": 0.5, "b": 0.3, "c": 0.2}
    cursor, straight = new_cursor(streams), []
    for _ in range(12):
        before = json.dumps(cursor)
        batch, cursor = next_global_batch(streams, cursor, mix, 6, 64)
        straight.append(batch)
    assert json.loads(before) != cursor  # the input cursor was not mutated ...
    saved = json.dumps(new_cursor(streams))
    for expected in straight:  # ... and a cursor through JSON resumes on the same rows
        batch, c = next_global_batch(streams, json.loads(saved), mix, 6, 64)
        assert torch.equal(batch, expected)
        saved = json.dumps(c)
    assert json.loads(saved) == cursor
    # The read order is per sequence: one big batch is the small ones stacked.
    big, c = next_global_batch(streams, new_cursor(streams), mix, 72, 64)
    assert torch.equal(big, torch.cat(straight)) and c == cursor


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_rank_slices_make_up_the_global_batch(streams, dp):
    batch, _ = next_global_batch(streams, new_cursor(streams), None, 8, 32)
    parts = [rank_slice(batch, r, dp) for r in range(dp)]
    assert all(p.shape == (8 // dp, 33) for p in parts)
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(DataError):
        rank_slice(batch, 0, 3)


def test_mixture_proportions_hold_over_every_prefix(streams):
    mix = {"a": 0.5, "b": 0.3, "c": 0.2}
    batch, cursor = next_global_batch(streams, new_cursor(streams), mix, 1000, 4)
    picked = source_of(batch)
    counts = dict.fromkeys("abc", 0)
    for n, name in enumerate(picked, start=1):
        counts[name] += 1
        assert all(abs(counts[k] - n * w) < 1 for k, w in mix.items()), (n, counts)
    assert cursor["offsets"] == {"a": 500 * 4, "b": 300 * 4, "c": 200 * 4}
    # No mixture: equal shares in sorted name order.
    batch, _ = next_global_batch(streams, new_cursor(streams), None, 6, 4)
    assert source_of(batch) == list("abcabc")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 9), st.floats(0.01, 5.0)), min_size=1, max_size=6))
def test_schedule_stays_within_one_sequence_of_quota(weights):
    s = Schedule(tuple(f"s{i}" for i in range(len(weights))), tuple(float(w) for w in weights))
    n = 3000
    onehot = np.zeros((n, len(weights)))
    onehot[np.arange(n), s.picks(0, n)] = 1
    share = np.asarray(s.shares) / s.period
    assert np.abs(np.cumsum(onehot, 0) - np.arange(1, n + 1)[:, None] * share).max() < 1
    assert np.allclose(share, np.asarray(weights) / sum(weights), rtol=0, atol=2e-5)


def test_mixture_weights_are_checked(streams):
    c = new_cursor(streams)
    batch, cur = next_global_batch(streams, c, {"a": 0.25, "b": 0.0, "c": 0.75}, 30, 4)
    assert "b" not in source_of(batch) and cur["offsets"]["b"] == 0
    for bad, msg in (({"zzz": 1.0}, "unknown source 'zzz'"), ({"a": -1.0}, ">= 0"),
                     ({"a": 0.0}, "positive"), ({"a": float("nan")}, ">= 0"),
                     ({"a": 1.0, "c": 2.0}, "must sum to 1")):
        with pytest.raises(DataError, match=msg):
            next_global_batch(streams, c, bad, 2, 4)
    with pytest.raises(DataError, match="cursor"):
        next_global_batch(streams, {"sequences": 0}, None, 2, 4)


def _work(fn):
    """(result, Python function calls, peak bytes allocated) of fn(): how much work, not how long."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")
    tracemalloc.start()
    sys.setprofile(count)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, calls, peak


def test_huge_sequence_numbers_are_fast(streams):
    """The work for a batch does not grow with how far into the stream it is."""
    mix = {"a": 0.5, "b": 0.3, "c": 0.2}
    start = 1_000_000_007
    _, calls_at_0, _ = _work(lambda: next_global_batch(streams, new_cursor(list(streams)), mix, 64, 16))
    cursor = {"sequences": start, "offsets": {"a": 10**12, "b": 5, "c": 0}}
    (batch, after), calls, peak = _work(lambda: next_global_batch(streams, cursor, mix, 64, 16))
    assert calls <= 2 * calls_at_0 and peak < 10 * 2**20, (calls, calls_at_0, peak)
    names = ("a", "b", "c")
    s = Schedule(names, (0.5, 0.3, 0.2))
    assert source_of(batch) == [names[s.pick(start + i)] for i in range(64)]
    assert after["sequences"] == start + 64 and after["offsets"]["a"] > 10**12
    assert int(batch[source_of(batch).index("a"), 0]) == shuffled_start(1000, 10**12, 16) % 1000


def test_windows_wrap_and_labels_are_inputs_shifted(streams):
    cursor = new_cursor(["a"])
    rows = []
    for _ in range(7):  # 7 * 300 tokens > the 1000 of stream a: wraps twice
        batch, cursor = next_global_batch({"a": streams["a"]}, cursor, None, 1, 300)
        rows.append(batch[0])
    for i, row in enumerate(rows):
        start = shuffled_start(1000, i * 300, 300)
        assert row.tolist() == [(start + j) % 1000 for j in range(301)]
        inputs, labels = row[:-1], row[1:]
        assert torch.equal(labels[:-1], inputs[1:])  # label j is input j + 1
    assert cursor == {"sequences": 7, "offsets": {"a": 2100}}
    # stream a has 3 whole windows of 300: each epoch reads each of them once
    starts = [int(r[0]) for r in rows[:6]]
    assert sorted(starts[:3]) == sorted(starts[3:6]) == [0, 300, 600]


def test_shuffled_order_is_a_permutation_per_epoch():
    for n_windows in (1, 2, 7, 64, 1000):
        seq = 8
        starts = [shuffled_start(n_windows * seq, k * seq, seq) for k in range(2 * n_windows)]
        assert sorted(starts[:n_windows]) == [w * seq for w in range(n_windows)]
        assert sorted(starts[n_windows:]) == [w * seq for w in range(n_windows)]
        if n_windows >= 64:  # neighbours in read order are far apart in the corpus
            assert min(abs(a - b) for a, b in zip(starts, starts[1:n_windows])) >= n_windows * seq // 10


def test_a_stream_shorter_than_one_window_is_tiled(streams):
    short = streams["c"]
    assert short.window(499, 1002).tolist() == [20000 + (499 + j) % 500 for j in range(1002)]


def test_cursor_keeps_offsets_of_sources_left_out(streams):
    cursor = {"sequences": 40, "offsets": {"a": 100, "b": 200, "gone": 7}}
    _, after = next_global_batch({"c": streams["c"]}, cursor, None, 3, 10)
    assert after["offsets"] == {"a": 100, "b": 200, "gone": 7, "c": 30}


def test_validation_batches_are_fixed(streams):
    first = validation_batches(streams, 4, 16, 3)
    assert [b.shape for b in first] == [(4, 17)] * 3
    assert all(torch.equal(x, y) for x, y in zip(first, validation_batches(streams, 4, 16, 3)))
    rows = torch.cat(first)
    assert source_of(rows) == list("abc") * 4  # round-robin in sorted order
    assert [int(r[0]) for r in rows[:6]] == [0, 10000, 20000, 16, 10016, 20016]  # consecutive windows
