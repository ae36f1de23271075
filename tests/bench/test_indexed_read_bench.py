"""bench/indexed_read.py compares like with like: the indexed dataset and the flat token file
it writes hold the same tokens, and next_global_batch draws the same batches from both."""
from __future__ import annotations

import numpy as np

from bench.indexed_read import FlatStream, write_corpus
from orchestrator.data.batches import new_cursor, next_global_batch
from orchestrator.data.indexed import TokenStream


def test_both_readers_give_the_same_batches_across_the_wrap(tmp_path):
    prefix, flat, documents = write_corpus(tmp_path, 100_000)
    indexed, plain = TokenStream.whole(prefix, "c"), FlatStream(flat, np.uint16)
    assert documents > 100 and len(indexed) == len(plain) >= 100_000
    a = b = new_cursor(["c"])
    for _ in range(60):  # 60 x 8 x 256 tokens: past the end of the corpus, so windows wrap
        x, a = next_global_batch({"c": indexed}, a, None, 8, 256)
        y, b = next_global_batch({"c": plain}, b, None, 8, 256)
        assert (x == y).all()
