"""Crash- and race-safe files for the token cache.

Everything in the cache is written to a temp file in the destination directory (so the
rename cannot cross file systems), fsynced, then renamed over the final name with
os.replace, which is atomic on POSIX. Readers therefore see either no file or a complete
one, never a prefix left by a killed process. Temp names carry the pid and a random
suffix, so concurrent preparers of the same key never write into each other's files; as
their inputs are identical, whichever rename lands last leaves the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.atomic import fsync_file


def stable_hash(obj: Any, digest_size: int = 16) -> str:
    """Hex digest of a JSON-serialisable value; key order does not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(text.encode(), digest_size=digest_size).hexdigest()


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


class IndexedWriter:
    """Documents appended to a temp indexed dataset beside `final` (a prefix), written by
    megatron-core's IndexedDatasetBuilder, one sequence per document; `commit` fsyncs it and
    renames the .bin, then the .idx: a reader needs both, and the .idx comes last.

    Used as a context manager: leaving the block without commit (an exception, a kill
    handled as KeyboardInterrupt) removes the temp files, so no half dataset is ever
    visible under the final name."""

    def __init__(self, final: Path, dtype: np.dtype):
        from orchestrator.data.indexed import megatron_indexed  # slow import, on use; indexed imports this module
        self.dtype = np.dtype(dtype)
        self.final = {ext: Path(f"{final}{ext}") for ext in (".bin", ".idx")}
        self.tmp = {ext: temp_path(path) for ext, path in self.final.items()}  # named *.tmp, not *.bin
        self.tokens = self.documents = 0
        self._builder = megatron_indexed().IndexedDatasetBuilder(str(self.tmp[".bin"]), dtype=self.dtype.type)

    def add(self, tokens: np.ndarray) -> None:
        """One document, one sequence."""
        self._builder.add_document(np.asarray(tokens, dtype=self.dtype), [len(tokens)])
        self.tokens += len(tokens)
        self.documents += 1

    def commit(self) -> None:
        self._builder.finalize(str(self.tmp[".idx"]))
        for ext in (".bin", ".idx"):
            fsync_file(self.tmp[ext])
            os.replace(self.tmp[ext], self.final[ext])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._builder.data_file.close()  # a no-op after commit
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)
