"""Tokenize each source once into memory-mapped token files, and read them back.

`prepare_data` is the only entry point that touches the corpus. Its output lives under
`<cache_dir>/<key>/` where the key hashes everything the tokens depend on (source config,
a metadata fingerprint of the content, the tokenizer, the split), so a second call with
the same inputs maps the files without reading or tokenizing anything, and any change
of input gets a fresh directory instead of silently reusing stale tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from orchestrator.config.schema import DataConfig, SourceConfig
from orchestrator.atomic import fsync_dir, read_json, write_json_atomic
from orchestrator.data.cache import TokenFileWriter, stable_hash
from orchestrator.data.corpus import content_fingerprint, is_validation, iter_documents
from orchestrator.data.errors import DataError
from orchestrator.data.tokenizer import Tokenizer, build_tokenizer, first_chars

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the file layout or the meaning of a key changes
CHUNK_CHARS = 4 << 20  # documents are tokenized in batches of about this much text


class TokenStream:
    """A read-only token file seen as an endless stream: offsets wrap modulo its length,
    which is how training goes past one epoch without any bookkeeping."""

    def __init__(self, path: Path, dtype: str | np.dtype, name: str = ""):
        self.path, self.name, self.dtype = Path(path), name, np.dtype(dtype)
        if self.path.stat().st_size < self.dtype.itemsize:
            raise DataError(f"{self.path}: empty token file")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, offset: int, length: int) -> np.ndarray:
        """int64 copy of tokens[offset : offset + length], wrapping around the end."""
        if offset < 0 or length < 0:
            raise ValueError(f"window needs offset, length >= 0, got {offset}, {length}")
        n = len(self)
        start = offset % n
        if start + length <= n:
            return np.array(self.tokens[start:start + length], dtype=np.int64)
        return self.tokens[(start + np.arange(length, dtype=np.int64)) % n].astype(np.int64)

    def __repr__(self) -> str:
        return f"TokenStream({self.name!r}, {len(self)} tokens, {self.path})"


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: dict[str, TokenStream]
    val: dict[str, TokenStream]
    built: dict[str, bool] = field(default_factory=dict)  # True: tokenized by this call
    meta: dict[str, dict] = field(default_factory=dict)  # each source's meta.json
    dirs: dict[str, Path] = field(default_factory=dict)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def _plain(src: SourceConfig) -> dict:
    return dataclasses.asdict(src) if dataclasses.is_dataclass(src) else dict(src)


def _chunks(docs: Iterable[tuple[str, str]], chars: int) -> Iterator[list[tuple[str, str]]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc[1])
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _build(name: str, src: SourceConfig, tok: Tokenizer, val_fraction: float, out: Path,
           meta: dict) -> dict:
    """Tokenize `src` into out/train.bin and out/val.bin; returns the completed meta."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(meta["dtype"])
    eos = np.array([tok.eos_id], dtype=dtype)
    bos_id = getattr(tok, "bos_id", None)  # an hf tokenizer's, written before each document
    head = [np.array([bos_id], dtype=dtype)] if bos_id is not None else []
    docs = {"train": 0, "val": 0}
    last = None  # the last document's tokens, for the never-empty-val rule
    with TokenFileWriter(out / "train.bin", dtype) as tw, TokenFileWriter(out / "val.bin", dtype) as vw:
        for chunk in _chunks(iter_documents(src), CHUNK_CHARS):
            parts = {"train": [], "val": []}
            for (doc_id, _), ids in zip(chunk, tok.encode_batch([t for _, t in chunk])):
                split = "val" if is_validation(doc_id, val_fraction) else "train"
                parts[split] += [*head, ids, eos]
                docs[split] += 1
                last = ids
            for split, w in (("train", tw), ("val", vw)):
                if parts[split]:
                    w.write(np.concatenate(parts[split]).astype(dtype, copy=False))
        if last is None:
            raise DataError(f"source {name!r} has no documents")
        if docs["val"] == 0:
            # Tiny inputs can hash every document into train; a stage's evaluation needs
            # something, so the last document moves to val (it was the last written).
            tw.truncate(tw.tokens - len(head) - len(last) - 1)
            vw.write(np.concatenate([*head, last, eos]).astype(dtype, copy=False))
            docs["train"] -= 1
            docs["val"] += 1
        if docs["train"] == 0:
            raise DataError(f"source {name!r}: no training documents left after the validation "
                            f"split ({docs['val']} document(s) in all); add more text")
        meta.update(train_tokens=tw.tokens, val_tokens=vw.tokens, train_docs=docs["train"],
                    val_docs=docs["val"])
        tw.commit()
        vw.commit()
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


def prepare_data(cfg: DataConfig, source_names: list[str] | None = None) -> PreparedData:
    """Token files for each named source (default: all of `cfg.sources`), built once.

    Per source: documents in corpus order, each followed by eos, split into train/val by
    `is_validation(doc_id, cfg.val_fraction)`. `PreparedData.built[name]` tells whether
    this call tokenized the source (False: the cache was reused untouched)."""
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if not cfg.sources:
        raise DataError("no data sources configured")
    names = list(cfg.sources) if source_names is None else list(source_names)
    unknown = [n for n in names if n not in cfg.sources]
    if unknown:
        raise DataError(f"unknown source {unknown[0]!r}; configured: {', '.join(cfg.sources)}")
    root = Path(os.path.expanduser(cfg.cache_dir))
    tok = _tokenizer(cfg, root)
    data = PreparedData(tokenizer=tok, train={}, val={})
    for name in names:
        src = cfg.sources[name]
        expected = {"format": FORMAT, "source_config": _plain(src), "content": content_fingerprint(src),
                    "tokenizer": tok.fingerprint, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                    "dtype": token_dtype(tok.vocab_size).name, "val_fraction": cfg.val_fraction}
        out = root / stable_hash({k: expected[k] for k in ("format", "source_config", "content",
                                                           "tokenizer", "val_fraction")})
        if getattr(tok, "bos_id", None) is not None:  # only then, so other caches keep their key
            expected["bos_id"] = tok.bos_id
        meta = _load(out, expected)
        data.built[name] = meta is None
        if meta is None:
            log.info("data: tokenizing source %r into %s", name, out)
            meta = _build(name, src, tok, cfg.val_fraction, out, {**expected, "source": name})
            log.info("data: %r: %d train / %d val tokens in %.1fs", name, meta["train_tokens"],
                     meta["val_tokens"], meta["seconds"])
        else:
            log.info("data: reusing %r from %s", name, out)
        data.meta[name], data.dirs[name] = meta, out
        data.train[name] = TokenStream(out / "train.bin", meta["dtype"], name)
        data.val[name] = TokenStream(out / "val.bin", meta["dtype"], name)
    return data
