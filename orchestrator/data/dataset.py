"""Tokenize each text source once into Megatron indexed datasets, and read every source back
through one reader (indexed.TokenStream).

`prepare_data` is the only entry point that touches the corpus. A text source's output is
`<cache_dir>/<key>/{train,val}.bin/.idx` (one sequence per document) and meta.json, where the key hashes everything the tokens depend on (source config,
a metadata fingerprint of the content, the tokenizer, the split), so a second call with
the same inputs maps the files without reading or tokenizing anything, and any change
of input gets a fresh directory instead of silently reusing stale tokens. A `kind: indexed`
source is already tokens: its datasets are opened where they are and split by document.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from orchestrator.config.schema import DataConfig, SourceConfig
from orchestrator.atomic import fsync_dir, read_json, write_json_atomic
from orchestrator.data.cache import stable_hash
from orchestrator.data.corpus import content_fingerprint, is_validation, iter_documents
from orchestrator.data.errors import DataError
from orchestrator.data.indexed import (TokenStream, check_indexed_tokenizer, check_prefix_tokenizer,
                                       indexed_splits, read_prefix_meta, token_dtype)
from orchestrator.data.prepare import locked, read_chunks, source_bytes, write_indexed
from orchestrator.data.progress import TokenizeProgress
from orchestrator.data.tokenizer import Tokenizer, build_tokenizer, first_chars

log = logging.getLogger(__name__)
FORMAT = 2  # 2: Megatron indexed datasets, not flat token files. Bump when the file layout or the meaning of a key changes


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: dict[str, TokenStream]
    val: dict[str, TokenStream]
    built: dict[str, bool] = field(default_factory=dict)  # True: tokenized by this call
    meta: dict[str, dict] = field(default_factory=dict)  # each source's meta.json
    dirs: dict[str, Path] = field(default_factory=dict)  # the cache dir of each text source


def _plain(src: SourceConfig) -> dict:
    return dataclasses.asdict(src) if dataclasses.is_dataclass(src) else dict(src)


def _build(name: str, src: SourceConfig, tok: Tokenizer, val_fraction: float, out: Path,
           meta: dict, workers: int = 1) -> dict:
    """Tokenize `src` into the indexed datasets out/train and out/val (each document
    [bos] ids eos, one sequence) with `grow prepare`'s writer (workers, progress, resumable
    parts in out/work); returns the completed meta, written last."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):  # a concurrent preparer of the same key: wait for it, then reuse its files
        return _load(out, meta) or _build_locked(name, src, tok, val_fraction, out, meta, workers, t0)


def _build_locked(name: str, src: SourceConfig, tok: Tokenizer, val_fraction: float, out: Path,
                  meta: dict, workers: int, t0: float) -> dict:
    def split(doc_id: str) -> str:
        return "val" if is_validation(doc_id, val_fraction) else "train"

    with TokenizeProgress(f"tokenizing {name}", source_bytes(src)) as progress:
        # Tiny inputs can hash every document into train; a stage's evaluation needs
        # something, so then the last document goes to val (never_empty).
        metas = write_indexed(read_chunks(src, label_of=split), {"train": out / "train", "val": out / "val"}, tok,
                              key={"content": meta["content"], "val_fraction": val_fraction}, work_dir=out / "work",
                              workers=workers, progress=progress, inputs=[name], never_empty=("val", "train"))
        progress.complete()
    train, val = metas["train"], metas["val"]
    if train["documents"] + val["documents"] == 0:
        raise DataError(f"source {name!r} has no documents")
    if train["documents"] == 0:
        raise DataError(f"source {name!r}: no training documents left after the validation "
                        f"split ({val['documents']} document(s) in all); add more text")
    meta.update(train_tokens=train["tokens"], val_tokens=val["tokens"], train_docs=train["documents"],
                val_docs=val["documents"])
    fsync_dir(out)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / "meta.json", meta)  # last: its presence means the rest is whole
    return meta


def _load(out: Path, expected: dict) -> dict | None:
    """The cached meta when out/ holds a complete preparation for `expected`, else None."""
    meta = read_json(out / "meta.json")
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        try:
            size = (out / f"{split}.bin").stat().st_size
            (out / f"{split}.idx").stat()
        except OSError:
            return None
        if size != meta.get(f"{split}_tokens", -1) * itemsize or size == 0:
            return None
    return meta


def _tokenizer(cfg: DataConfig, root: Path) -> Tokenizer:
    """The tokenizer for `cfg`. A BPE learns from the train documents of all configured
    sources (config order), whichever subset is being prepared, so every subset shares
    one vocabulary; it is keyed by those sources' content fingerprints. With
    `tokenizer.train_mix`, source k gives its first train_mix[k] x train_chars characters,
    so the vocabulary is learnt from a chosen share of each language (a short source gives
    all it has: its share is then smaller, and the log says so)."""
    if cfg.tokenizer.kind != "bpe":
        return build_tokenizer(cfg.tokenizer, lambda: (), root / "tokenizers")
    content = stable_hash({"format": FORMAT, "val_fraction": cfg.val_fraction,
                           "sources": [[n, _plain(s), content_fingerprint(s)] for n, s in cfg.sources.items()]})
    mix = cfg.tokenizer.train_mix

    def train_docs(src: SourceConfig) -> Iterator[str]:
        return (text for doc_id, text in iter_documents(src) if not is_validation(doc_id, cfg.val_fraction))

    def texts():
        for n, s in cfg.sources.items():
            if not mix:
                yield from train_docs(s)
            elif mix.get(n, 0) > 0:
                quota = round(mix[n] * cfg.tokenizer.train_chars)
                texts = list(first_chars(train_docs(s), quota))  # whole, to say how much there was
                got = sum(map(len, texts))
                log.info("data: the tokenizer learns from %d characters of %r (%.1f%% of its share)",
                         got, n, 100 * got / max(1, quota))
                yield from texts

    return build_tokenizer(cfg.tokenizer, texts, root / "tokenizers", content_key=content)


def _cached_text(name: str, src: SourceConfig, tok: Tokenizer, cfg: DataConfig, root: Path) -> tuple[dict, Path, bool]:
    """(meta, dir, built) of a text source's token cache, tokenizing it unless it is there."""
    expected = {"format": FORMAT, "source_config": _plain(src), "content": content_fingerprint(src),
                "tokenizer": tok.fingerprint, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                "dtype": token_dtype(tok.vocab_size).name, "val_fraction": cfg.val_fraction}
    out = root / stable_hash({k: expected[k] for k in ("format", "source_config", "content",
                                                       "tokenizer", "val_fraction")})
    if getattr(tok, "bos_id", None) is not None:  # only then, so other caches keep their key
        expected["bos_id"] = tok.bos_id
    meta = _load(out, expected)
    if meta is not None:
        log.info("data: reusing %r from %s", name, out)
        return meta, out, False
    log.info("data: tokenizing source %r into %s", name, out)
    meta = _build(name, src, tok, cfg.val_fraction, out, {**expected, "source": name})
    log.info("data: %r: %d train / %d val tokens in %.1fs", name, meta["train_tokens"],
             meta["val_tokens"], meta["seconds"])
    return meta, out, True


def prepare_data(cfg: DataConfig, source_names: list[str] | None = None) -> PreparedData:
    """A train and a val TokenStream for each named source (default: all of `cfg.sources`).

    Text sources are tokenized once: documents in corpus order, each followed by eos, split
    into train/val by `is_validation(doc_id, cfg.val_fraction)`. `PreparedData.built[name]`
    tells whether this call tokenized the source (False: the cache was reused untouched, or
    the source is `kind: indexed` and was already tokens)."""
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if not cfg.sources:
        raise DataError("no data sources configured")
    names = list(cfg.sources) if source_names is None else list(source_names)
    unknown = [n for n in names if n not in cfg.sources]
    if unknown:
        raise DataError(f"unknown source {unknown[0]!r}; configured: {', '.join(cfg.sources)}")
    check_indexed_tokenizer(cfg)
    root = Path(os.path.expanduser(cfg.cache_dir))
    tok = _tokenizer(cfg, root)
    data = PreparedData(tokenizer=tok, train={}, val={})
    for name in names:
        src = cfg.sources[name]
        if src.kind == "indexed":
            for prefix in map(os.path.expanduser, src.paths):
                check_prefix_tokenizer(prefix, read_prefix_meta(prefix), cfg.tokenizer.kind, tok.fingerprint)
            data.train[name], data.val[name], data.meta[name] = indexed_splits(
                name, src.paths, cfg.val_fraction, tok.eos_id)
            data.built[name] = False
            continue
        meta, out, data.built[name] = _cached_text(name, src, tok, cfg, root)
        data.meta[name], data.dirs[name] = meta, out
        data.train[name] = TokenStream.whole(out / "train", name)
        data.val[name] = TokenStream.whole(out / "val", name)
    return data
