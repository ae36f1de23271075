"""Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`) as endless token streams.

Every token training reads comes through `TokenStream`: the token cache that a run builds
from text is written in this format (dataset.py), and `kind: indexed` sources point at
datasets the user already has (made by Megatron's preprocess_data.py, GPT-NeoX, NeMo or
`grow prepare`). Files are opened memory-mapped through megatron-core's own
`IndexedDataset`, never loaded whole and never parsed here.

A stream is a list of parts (one per prefix), each a sorted selection of the prefix's
sequences; the stream's tokens are those sequences one after the other, as stored: like
Megatron's GPTDataset, which expects preprocessing to have appended the EOD
(`--append-eod`), nothing is added between documents. A window at a token offset is found
with np.searchsorted over cumulative lengths and read with `IndexedDataset.get`, one call
per run of adjacent sequences: the .bin of a dataset is its sequences back to back (checked
when it is opened), so a get may read across a sequence's end.

The validation split is by document (Megatron's document_indices: a document is one
sequence unless the corpus was split into sentences): a keyed hash of (the prefix's file
name, the document's index), the same on every machine and wherever the files are moved.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from orchestrator.atomic import read_json, write_json_atomic
from orchestrator.data.cache import stable_hash
from orchestrator.data.errors import DataError

log = logging.getLogger(__name__)
SCAN_CHUNK = 1 << 24  # tokens per step of the min/max scan: bounded memory on any .bin
SPLIT_CHUNK = 1 << 22  # documents hashed per step of the split
EOD_SAMPLE = 256  # documents whose last token is looked at for the missing-EOD warning
META_TOKENIZER_KEYS = ("kind", "fingerprint", "vocab_size", "eos_id", "bos_id")


def megatron_indexed():
    """megatron-core's indexed_dataset module, imported on first use: importing megatron.core
    costs seconds, which commands that never read a dataset should not pay. Quietly: the
    package says at import, in four warnings and three INFO lines, that Transformer Engine
    and Apex are absent (nothing here uses them), and logs seven INFO lines per dataset
    opened (a run opens two per source, every launch)."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class _BadHeader(Exception):
    pass


def _open_megatron(prefix: str):
    """IndexedDataset(prefix); a bad header raises _BadHeader(why). The half-built dataset's
    __del__ fails on the attribute its __init__ never set (megatron-core prints that as
    "Exception ignored ... AttributeError"): it is collected here, with that report muted."""
    module, hook = megatron_indexed(), sys.unraisablehook
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, AttributeError) else hook(u)
    try:
        try:
            return module.IndexedDataset(prefix)
        except (AssertionError, ValueError, KeyError, OSError) as e:  # megatron asserts on a bad header
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
        gc.collect()
    finally:
        sys.unraisablehook = hook
    raise _BadHeader(why)


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype Megatron's preprocess_data.py picks for a vocabulary (uint16, else int32)."""
    return np.dtype(megatron_indexed().DType.optimal_dtype(vocab_size))


# -- <prefix>.json: which tokenizer the ids belong to ------------------------------------
def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def read_prefix_meta(prefix: str | Path) -> dict | None:
    """The metadata beside a dataset, `{"tokenizer": {kind, fingerprint, vocab_size, eos_id,
    bos_id}, "documents", "tokens", ...}`, or None when there is none (a corpus Megatron's own
    tools built). A file that is there but unreadable or incomplete is an error, not None."""
    path = meta_path(prefix)
    if not path.exists():
        return None
    meta = read_json(path)
    tok = meta.get("tokenizer") if isinstance(meta, dict) else None
    missing = [k for k in META_TOKENIZER_KEYS if not isinstance(tok, dict) or k not in tok]
    missing += [k for k in ("documents", "tokens") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{path}: not a dataset's metadata (no {', '.join(missing)}); fix or remove it")
    return meta


def check_prefix_tokenizer(prefix: str | Path, meta: dict | None, kind: str, fingerprint: str) -> None:
    """Refuse a dataset whose metadata (None: there is none) names another tokenizer than the run's."""
    if meta is None:
        return
    theirs = meta["tokenizer"]
    if (theirs["kind"], theirs["fingerprint"]) != (kind, fingerprint):
        raise DataError(f"{prefix}: its ids are from tokenizer {theirs['kind']} {theirs['fingerprint']} "
                        f"({meta_path(prefix).name}), the run's is {kind} {fingerprint}; set data.tokenizer "
                        "to the one that wrote it")


# -- opening and checking ---------------------------------------------------------------
def open_dataset(prefix: str | Path):
    """megatron-core's IndexedDataset at `prefix`, after checking that its .bin is exactly
    what its .idx describes (a truncated copy or a mismatched pair would read garbage or
    fail mid-training). Raises DataError with one line."""
    prefix = str(prefix)
    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"{prefix}: no {prefix}{ext} (an indexed source's path is the prefix, "
                            "without .bin/.idx)")
    try:
        ds = _open_megatron(prefix)
    except _BadHeader as e:
        raise DataError(f"{prefix}.idx: not a Megatron index ({e})") from None
    lengths, pointers = ds.sequence_lengths, ds.index.sequence_pointers
    itemsize = np.dtype(ds.index.dtype).itemsize
    starts = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * itemsize
    if len(lengths) == 0 or len(ds.document_indices) < 2:
        raise DataError(f"{prefix}: an empty dataset (no documents)")
    if not np.array_equal(pointers, starts):
        raise DataError(f"{prefix}.idx does not match {prefix}.bin: its sequences are not stored back to back")
    expected, size = int(lengths.sum(dtype=np.int64)) * itemsize, os.path.getsize(prefix + ".bin")
    if size != expected:
        what = "truncated" if size < expected else "longer than its index says"
        raise DataError(f"{prefix}.bin is {what}: {size} bytes, {prefix}.idx says {expected}; "
                        "rebuild or recopy the pair")
    return ds


def token_range(prefix: str | Path, ds, cache_dir: Path) -> tuple[int, int]:
    """(min, max) token id of a dataset, scanned in chunks with numpy and remembered in
    `cache_dir` keyed by the .bin's (path, size, mtime), so a rerun does not rescan."""
    bin_path = Path(f"{prefix}.bin").resolve()
    st = bin_path.stat()
    record = Path(cache_dir) / "indexed-scan" / f"{stable_hash([str(bin_path), st.st_size, st.st_mtime_ns])}.json"
    known = read_json(record)
    if isinstance(known, dict) and {"min", "max"} <= known.keys():
        return known["min"], known["max"]
    tokens = np.memmap(bin_path, dtype=ds.index.dtype, mode="r")
    lo, hi = None, None
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = tokens[start:start + SCAN_CHUNK]
        lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
        hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
    del tokens
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {"min": lo, "max": hi, "bin": str(bin_path)})
    return lo, hi


def check_prefix(prefix: str, vocab: int, tokenizer_kind: str, fingerprint: str, cache_dir: Path) -> None:
    """Everything a run needs of one dataset, before it trains: the pair is whole and
    consistent, its metadata (if any) names the run's tokenizer, its dtype holds integers,
    and every id is one of the tokenizer's `vocab`."""
    ds = open_dataset(prefix)
    check_prefix_tokenizer(prefix, read_prefix_meta(prefix), tokenizer_kind, fingerprint)
    dtype = np.dtype(ds.index.dtype)
    if dtype.kind not in "iu":
        raise DataError(f"{prefix}: tokens stored as {dtype.name}, not integers; it is not a tokenized corpus")
    lo, hi = token_range(prefix, ds, cache_dir)
    if lo < 0 or hi >= vocab:
        raise DataError(f"{prefix}: token id {hi if hi >= vocab else lo} is outside the tokenizer's {vocab} ids "
                        f"(data.tokenizer.kind={tokenizer_kind}); it was tokenized with another vocabulary")


# -- the split ----------------------------------------------------------------------------
def validation_mask(name: str, documents: int, fraction: float) -> np.ndarray:
    """bool per document: in the validation split. splitmix64 of (a key of `name`, index),
    vectorised: the same on every machine; 1e7 documents take about a second."""
    seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=b"val-split").digest(), "big")
    threshold = np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
    out = np.empty(documents, dtype=bool)
    with np.errstate(over="ignore"):
        for start in range(0, documents, SPLIT_CHUNK):
            z = np.arange(start, min(documents, start + SPLIT_CHUNK), dtype=np.uint64) + np.uint64(seed)
            z += np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            out[start:start + len(z)] = (z ^ (z >> np.uint64(31))) < threshold
    return out


# -- the stream -----------------------------------------------------------------------------
class _Part:
    """Some sequences of one dataset: `ids` sorted, `ends` the cumulative token count."""

    def __init__(self, ds, ids: np.ndarray):
        self.ds, self.ids = ds, ids
        self.ends = np.cumsum(ds.sequence_lengths[ids], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, out: np.ndarray) -> None:
        """out[:] = this part's tokens [start, start + len(out)), which must exist."""
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, start + len(out) - 1, side="right"))
        if int(self.ids[last]) - int(self.ids[first]) == last - first:  # adjacent: one read, the usual case
            out[:] = self.ds.get(int(self.ids[first]), start - (int(self.ends[first - 1]) if first else 0), len(out))
            return
        ids = self.ids[first:last + 1]
        run_starts = np.flatnonzero(np.diff(ids) != 1) + 1  # adjacent ids are read in one get
        run_ends = np.append(run_starts, len(ids)) - 1  # index into ids of each run's last sequence
        pos = 0
        offset = start - (int(self.ends[first - 1]) if first else 0)  # into the run's first sequence
        for a, b in zip(np.concatenate(([0], run_starts)).tolist(), run_ends.tolist()):
            take = min(len(out) - pos, int(self.ends[first + b]) - (start + pos))
            out[pos:pos + take] = self.ds.get(int(ids[a]), offset, take)
            pos += take
            offset = 0


class TokenStream:
    """Selected sequences of one or more indexed datasets, in order, seen as an endless
    stream: offsets wrap modulo its length, which is how training goes past one epoch
    without any bookkeeping."""

    def __init__(self, parts: list[tuple[object, np.ndarray]], name: str = ""):
        self.name = name
        self.parts = [p for p in (_Part(ds, np.asarray(ids, dtype=np.int64)) for ds, ids in parts) if len(p)]
        if not self.parts:
            raise DataError(f"{name or 'stream'}: no tokens")
        self.part_ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

    @classmethod
    def whole(cls, prefix: str | Path, name: str = "") -> "TokenStream":
        """Every sequence of the dataset at `prefix` (the token cache's splits)."""
        ds = open_dataset(prefix)
        return cls([(ds, np.arange(len(ds), dtype=np.int64))], name)

    def __len__(self) -> int:
        return int(self.part_ends[-1])

    def window(self, offset: int, length: int) -> np.ndarray:
        """int64 copy of tokens[offset : offset + length], wrapping around the end."""
        if offset < 0 or length < 0:
            raise ValueError(f"window needs offset, length >= 0, got {offset}, {length}")
        n = len(self)
        out = np.empty(length, dtype=np.int64)
        pos, at = 0, offset % n
        while pos < length:
            k = int(np.searchsorted(self.part_ends, at, side="right"))
            part_start = int(self.part_ends[k - 1]) if k else 0
            take = min(length - pos, int(self.part_ends[k]) - at)
            self.parts[k].read(at - part_start, out[pos:pos + take])
            pos += take
            at = (at + take) % n
        return out

    def __repr__(self) -> str:
        return f"TokenStream({self.name!r}, {len(self)} tokens, {len(self.parts)} part(s))"


# -- a kind: indexed source ------------------------------------------------------------------
def _warn_missing_eod(prefix: str, ds, eos_id: int) -> None:
    """Documents are packed as stored; say so when a sample of them lacks the eos at its end
    (a corpus preprocessed without --append-eod runs its documents together)."""
    last_seq = np.asarray(ds.document_indices[1:], dtype=np.int64) - 1
    sample = last_seq[np.unique(np.linspace(0, len(last_seq) - 1, min(EOD_SAMPLE, len(last_seq))).astype(np.int64))]
    lengths = ds.sequence_lengths[sample]
    ends = [int(ds.get(int(s), int(n) - 1, 1)[0]) for s, n in zip(sample.tolist(), lengths.tolist()) if n > 0]
    missing = sum(e != eos_id for e in ends)
    if missing:
        log.warning("data: %s: %d of %d sampled documents do not end with eos %d; documents are read as stored "
                    "(nothing is added between them), as Megatron's GPTDataset does: preprocess with --append-eod",
                    prefix, missing, len(ends), eos_id)


def indexed_splits(name: str, prefixes: list[str], val_fraction: float,
                   eos_id: int | None = None) -> tuple[TokenStream, TokenStream, dict]:
    """(train, val, meta) of a `kind: indexed` source: its prefixes' documents concatenated
    in config order, each in the split `validation_mask` gives it. The validation split is
    never empty: when the hash puts every document in train, the last one moves to val."""
    if not prefixes:
        raise DataError(f"source {name!r}: an indexed source needs at least one path (a dataset prefix)")
    opened = [(p, open_dataset(p)) for p in (os.path.expanduser(p) for p in prefixes)]
    if eos_id is not None:
        for p, ds in opened:
            _warn_missing_eod(p, ds, eos_id)
    masks = [validation_mask(Path(p).name, len(ds.document_indices) - 1, val_fraction) for p, ds in opened]
    if not any(m.any() for m in masks):
        masks[-1][-1] = True
    train_docs, val_docs = sum(int((~m).sum()) for m in masks), sum(int(m.sum()) for m in masks)
    if train_docs == 0:
        raise DataError(f"source {name!r}: no training documents left after the validation split "
                        f"({val_docs} document(s) in all); add more data")
    splits = {"train": [], "val": []}
    for (p, ds), m in zip(opened, masks):
        in_val = np.repeat(m, np.diff(ds.document_indices))  # per sequence
        splits["train"].append((ds, np.flatnonzero(~in_val)))
        splits["val"].append((ds, np.flatnonzero(in_val)))
    train, val = TokenStream(splits["train"], name), TokenStream(splits["val"], name)
    meta = {"source": name, "kind": "indexed", "prefixes": [p for p, _ in opened],
            "dtype": np.dtype(opened[0][1].index.dtype).name, "train_docs": train_docs, "val_docs": val_docs,
            "train_tokens": len(train), "val_tokens": len(val)}
    return train, val, meta


def check_indexed_tokenizer(cfg) -> None:
    """An indexed source holds the ids of the tokenizer that wrote it, so the run must be
    given that tokenizer (kind byte, or hf with its tokenizer.json). A bpe is refused: the
    run would train a new vocabulary (from text an indexed source does not have) that the
    stored ids do not belong to. `cfg` is a DataConfig."""
    indexed = [n for n, s in cfg.sources.items() if s.kind == "indexed"]
    if indexed and cfg.tokenizer.kind == "bpe":
        raise DataError(f"source {indexed[0]!r} is indexed (token ids) and data.tokenizer.kind=bpe would train "
                        "a new vocabulary; give the tokenizer that wrote it: kind=hf with its path, or kind=byte",
                        "data.tokenizer.kind")
