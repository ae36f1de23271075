"""`grow prepare`: text and JSONL -> Megatron .bin/.idx read back with megatron-core's own
IndexedDataset, the same bytes for 1 and 2 workers, a SIGKILLed run resumed to the same
bytes, and one-line refusals (exit 2)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.cli import main
from orchestrator.config.schema import SourceConfig
from orchestrator.data.indexed import read_prefix_meta
from orchestrator.data.prepare import prepare_files
from orchestrator.data.tokenizer import BpeTokenizer, ByteTokenizer, HfTokenizer

REPO = Path(__file__).resolve().parents[2]
GROW = REPO / ".venv" / "bin" / "grow"


def _documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["growth", "schedule", "模型", "données", "tokens", "\n", "ünïcode", "😀", "the", "of"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]


def _files(files: list[tuple[str, Path]]) -> list[bytes]:
    return [Path(f"{prefix}{ext}").read_bytes() for prefix, _ in files for ext in (".bin", ".idx", ".json")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL file and a directory of two text files (one document each), and an hf
    tokenizer.json: a BPE learnt from the same text, with <|endoftext|> as eos."""
    root = tmp_path_factory.mktemp("prepare")
    docs = _documents(400, 0)
    jsonl = root / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)), encoding="utf-8")
    texts = root / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("first text file\nwith two lines\n", encoding="utf-8")
    (texts / "b.txt").write_text("second: " + docs[0], encoding="utf-8")
    tok_file = root / "tokenizer.json"
    BpeTokenizer.train(docs, vocab_size=400).save(tok_file)
    return {"root": root, "docs": docs, "jsonl": jsonl, "texts": texts, "tok_file": tok_file}


def _source(*paths: Path) -> SourceConfig:
    return SourceConfig(kind="files", paths=[str(p) for p in paths])


@pytest.fixture(scope="module")
def prepared(corpus):
    """The corpus prepared with 1 and with 2 workers (small chunks, so there are many)."""
    tok = HfTokenizer(corpus["tok_file"])
    out = {}
    for workers in (1, 2):
        prefix = corpus["root"] / f"w{workers}_text_document"
        meta = prepare_files(_source(corpus["jsonl"], corpus["texts"]), prefix, tok, workers=workers,
                             chunk_bytes=2000)
        out[workers] = (prefix, meta)
    return tok, out


def test_read_back_equals_tokenizing_each_document(corpus, prepared):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok, out = prepared
    prefix, meta = out[1]
    expected = corpus["docs"] + [(corpus["texts"] / n).read_text(encoding="utf-8") for n in ("a.txt", "b.txt")]
    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(expected) == meta["documents"]
    assert ds.index.dtype == np.uint16
    for i, text in enumerate(expected):
        assert ds[i].tolist() == tok.encode(text) + [tok.eos_id], i
    assert meta["tokens"] == int(ds.sequence_lengths.sum())
    on_disk = read_prefix_meta(prefix)  # the reader `kind: indexed` sources check it with
    assert on_disk == meta
    assert on_disk["tokenizer"] == {"kind": "hf", "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                                    "eos_id": tok.eos_id, "bos_id": None}
    assert not Path(f"{prefix}.work").exists()  # the parts are gone once published


def test_two_workers_write_the_same_bytes_as_one(prepared):
    _, out = prepared
    assert _files([out[1]]) == _files([out[2]])


def _grow(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(GROW), "prepare", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_sigkill_then_rerun_gives_the_uninterrupted_bytes(tmp_path):
    """Killed once a few parts are finished; the rerun keeps them, redoes the rest, and
    writes what a run never interrupted writes."""
    big = tmp_path / "big.jsonl"
    with big.open("w", encoding="utf-8") as f:
        for t in _documents(2500, 1):
            f.write(json.dumps({"text": t}) + "\n")
    args = [f"input={big}", "chunk_mb=0.01"]
    killed = tmp_path / "killed_text_document"
    proc = _grow(*args, f"output={killed}")
    work = Path(f"{killed}.work")
    deadline = time.monotonic() + 120
    while len(list(work.glob("*.done"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(work.glob("*.done")))
    assert kept >= 3 and not Path(f"{killed}.idx").exists(), "killed before or after the tokenizing"
    rerun = _grow(*args, f"output={killed}")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "finished part(s) kept" in err
    whole = tmp_path / "whole_text_document"
    prepare_files(_source(big), whole, ByteTokenizer(), chunk_bytes=10_000)
    assert _files([(killed, None)]) == _files([(whole, None)])
    assert json.loads(Path(f"{killed}.json").read_text())["documents"] == 2500
    assert not work.exists()


def _refusal(capsys, *args: str) -> str:
    assert main(["prepare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_refuses_an_existing_output(corpus, prepared, capsys):
    _, out = prepared
    prefix = out[1][0]
    before = Path(f"{prefix}.bin").read_bytes()
    err = _refusal(capsys, f"input={corpus['jsonl']}", f"output={prefix}")
    assert "exists" in err and "overwrite=true" in err
    assert Path(f"{prefix}.bin").read_bytes() == before


def test_refuses_bad_input_in_one_line(corpus, tmp_path, capsys):
    out = f"output={tmp_path / 'x_text_document'}"
    assert "no such file or directory" in _refusal(capsys, f"input={tmp_path / 'missing.jsonl'}", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    assert f"{bad}:2: not valid JSON" in _refusal(capsys, f"input={bad}", out)
    assert "colour: unknown key" in _refusal(capsys, f"input={corpus['jsonl']}", out, "colour=red")
    assert "data.tokenizer.kind" in _refusal(capsys, f"input={corpus['jsonl']}", out, "data.tokenizer.kind=words")
    assert not list(tmp_path.glob("x_text_document*"))
