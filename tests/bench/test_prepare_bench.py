"""bench/prepare.py's corpus and its memory probe, in seconds: the corpus is the size asked
for and valid JSONL; the peak RSS counts a child process's memory, not only the parent's."""
from __future__ import annotations

import json
import sys

from bench import prepare as bench


def test_corpus_reaches_its_size_as_jsonl_documents(tmp_path):
    path = tmp_path / "c.jsonl"
    size = bench.write_corpus(path, 0.2)
    assert size == path.stat().st_size >= 200_000
    texts = bench.texts_of(path)
    assert texts and all(isinstance(t, str) and t for t in texts)
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["text"] == texts[0]


def test_peak_rss_sums_the_process_and_its_children():
    child = "import time; b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    peak, seconds = bench.peak_rss_of([sys.executable, "-c", parent])
    assert peak >= 300 and seconds >= 1.0
