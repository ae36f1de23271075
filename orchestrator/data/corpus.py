"""Documents of a source, in an order that is the same on every run and machine.

The order matters because token files, the validation split and resumable read cursors
are all defined in terms of it: if the walk order changed, a resumed run would read
different text than the one that was checkpointed.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from orchestrator.config.schema import SourceConfig
from orchestrator.data.errors import DataError

SKIP_DIRS = ("site-packages", "__pycache__")
JSONL_SUFFIXES = (".jsonl", ".json")


# -- embedded: text every Python install has ------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[tuple[str, Path]]:
    """(posix relative path, path) of every .py file of the standard library, sorted.

    site-packages is skipped because it differs between installs of the same Python."""
    root = stdlib_root()
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        for f in files:
            if f.endswith(".py"):
                p = Path(d, f)
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])
    return found


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return topics


def _embedded(source: SourceConfig) -> Iterator[tuple[str, str]]:
    for rel, path in stdlib_files():
        # The stdlib carries a few deliberately non-UTF-8 test files; this is the one
        # place where replacing bad bytes is allowed (we do not own that text).
        yield f"stdlib/{rel}", path.read_bytes().decode("utf-8", errors="replace")
    topics = pydoc_topics()
    for key in sorted(topics):
        yield f"pydoc/{key}", topics[key]


# -- files: the user's text ----------------------------------------------------------
def source_files(source: SourceConfig) -> list[tuple[str, Path]]:
    """(doc-id prefix, path) of every file a `files` source reads, in read order.

    Paths keep their config order; directories are walked recursively, sorted, and
    filtered by `glob` on the file name. The doc-id prefix is the path as written in the
    config (plus the relative path under a directory), so the validation split does not
    depend on where the home directory is. Missing paths and directories without a
    matching file raise here, before anything is read."""
    if not source.paths:
        raise DataError("a files source needs at least one path")
    out = []
    for given in source.paths:
        path = Path(os.path.expanduser(given))
        if not path.exists():
            raise DataError(f"{given}: no such file or directory")
        if not path.is_dir():  # a file (or a FIFO or device, which check_data_sources refuses)
            out.append((given, path))
            continue
        matched = []
        for d, dirs, files in os.walk(path):
            dirs.sort()
            for f in files:
                if fnmatch.fnmatchcase(f, source.glob):
                    p = Path(d, f)
                    matched.append((p.relative_to(path).as_posix(), p))
        if not matched:
            raise DataError(f"{given}: no files match glob {source.glob!r}")
        matched.sort(key=lambda t: t[0])
        out.extend((f"{given.rstrip('/')}/{rel}", p) for rel, p in matched)
    return out


def file_format(source: SourceConfig, path: Path) -> str:
    if source.format == "auto":
        return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"
    if source.format not in ("text", "jsonl"):
        raise DataError(f"unknown format {source.format!r}; allowed: auto, text, jsonl")
    return source.format


def _utf8(raw: bytes, path: Path, base: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {base + e.start}") from None


def iter_jsonl(prefix: str, path: Path, key: str) -> Iterator[tuple[str, str]]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _utf8(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue  # a trailing newline or blank separator is not a document
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or key not in obj:
                raise DataError(f"{path}:{lineno}: no key {key!r}")
            text = obj[key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: {key!r} is {type(text).__name__}, not a string")
            yield f"{prefix}:{lineno}", text


def _files(source: SourceConfig, files: list[tuple[str, Path]]) -> Iterator[tuple[str, str]]:
    for prefix, path in files:
        if file_format(source, path) == "jsonl":
            yield from iter_jsonl(prefix, path, source.jsonl_key)
        else:
            yield prefix, _utf8(path.read_bytes(), path)


def iter_documents(source: SourceConfig) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every document of `source`, in a deterministic order."""
    if source.kind == "embedded":
        return _embedded(source)
    if source.kind == "files":
        # list (and fail on missing paths) now, not at the first next()
        return _files(source, source_files(source))
    raise DataError(f"unknown source kind {source.kind!r}; allowed: embedded, files")


# -- content fingerprints and the split ----------------------------------------------
def content_fingerprint(source: SourceConfig) -> str:
    """A hash that changes when the text a source would yield may have changed, computed
    from metadata only (no file is read), so a cache hit costs a directory walk."""
    h = hashlib.blake2b(digest_size=16)
    if source.kind == "embedded":
        import sys
        h.update(f"{sys.version}\0{stdlib_root()}\0".encode())
        for rel, path in stdlib_files():
            h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        h.update(f"pydoc\0{len(pydoc_topics())}".encode())
    elif source.kind == "files":
        for prefix, path in source_files(source):
            st = path.stat()
            h.update(f"{prefix}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    else:
        raise DataError(f"unknown source kind {source.kind!r}; allowed: embedded, files")
    return h.hexdigest()


def is_validation(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the validation split.

    A keyed hash of the doc id (not Python's salted hash(), not a random draw), so the
    same document lands in the same split on every machine, Python version and run."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, person=b"val-split").digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64
