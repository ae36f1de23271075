"""Real Megatron indexed datasets for the data tests, written by megatron-core's own
IndexedDatasetBuilder (what Megatron's preprocess_data.py uses)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def write_dataset(prefix: Path | str, documents, dtype=np.uint16) -> str:
    """`documents`: token lists, or lists of token lists (a document of several sequences,
    as preprocess_data.py --split-sentences writes). Returns the prefix."""
    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        sequences = doc if len(doc) and isinstance(doc[0], (list, np.ndarray)) else [doc]
        builder.add_document(np.concatenate([np.asarray(s, dtype=dtype) for s in sequences]),
                             [len(s) for s in sequences])
    builder.finalize(prefix + ".idx")
    return prefix


def chunked(tokens, sizes=(37, 5, 61, 1, 23)) -> list[np.ndarray]:
    """`tokens` cut into documents of cycling sizes, so windows cross document ends."""
    tokens, out, i, k = np.asarray(tokens), [], 0, 0
    while i < len(tokens):
        out.append(tokens[i:i + sizes[k % len(sizes)]])
        i, k = i + sizes[k % len(sizes)], k + 1
    return out
