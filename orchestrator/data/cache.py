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


def stable_hash(obj: Any, digest_size: int = 16) -> str:
    """Hex digest of a JSON-serialisable value; key order does not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(text.encode(), digest_size=digest_size).hexdigest()


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


class TokenFileWriter:
    """Appends token arrays to a temp file; `commit` makes it the final file atomically.

    Used as a context manager: leaving the block without commit (an exception, a kill
    handled as KeyboardInterrupt) removes the temp file, so no half file is ever visible
    under the final name."""

    def __init__(self, final: Path, dtype: np.dtype):
        self.final, self.dtype = final, np.dtype(dtype)
        self.tmp = temp_path(final)
        self.tokens = 0
        self._f = open(self.tmp, "wb", buffering=1 << 20)

    def write(self, tokens: np.ndarray) -> None:
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._f.write(arr.tobytes())
        self.tokens += arr.size

    def truncate(self, tokens: int) -> None:
        """Drop everything after the first `tokens` tokens."""
        self._f.flush()
        self._f.truncate(tokens * self.dtype.itemsize)
        self._f.seek(0, os.SEEK_END)
        self.tokens = tokens

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.final)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)
