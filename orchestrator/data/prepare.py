"""Text and JSONL -> a Megatron indexed dataset (`<prefix>.bin/.idx`), written by
megatron-core's own `IndexedDatasetBuilder`, with a `<prefix>.json` that names the tokenizer.

How it stays fast, small, resumable and safe:
- Documents are read in input order and cut into chunks of about `chunk_bytes` of text.
  The cut depends on the input only, so chunk k is the same text on every run and with any
  number of workers.
- Worker processes tokenize whole chunks (each document: bos when the tokenizer has one, its
  ids, eos, one sequence, like Megatron's preprocess_data.py --append-eod); the parent
  writes chunk k as part k in a work dir beside the output. At most 2 x workers chunks are
  in flight, so memory does not grow with the corpus.
- A part is published by renaming its .idx last and then a `.done` marker; a rerun after a
  kill keeps the marked parts and redoes the rest. The work dir is keyed by the inputs
  (paths, sizes, mtimes) and the tokenizer, so stale parts are never merged.
- The parts are merged in chunk order with the builder's `add_index` under a temp prefix,
  fsynced, and published json, .bin, then .idx: a reader needs the .idx, so a kill before
  the last rename leaves nothing that reads as a dataset.
"""
from __future__ import annotations

import contextlib
import fcntl
import gc
import multiprocessing
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from orchestrator.atomic import fsync_dir, fsync_file, read_json, write_json_atomic
from orchestrator.config.schema import SourceConfig
from orchestrator.data.cache import IndexedWriter
from orchestrator.data.corpus import iter_documents, source_files
from orchestrator.data.errors import DataError
from orchestrator.data.indexed import megatron_indexed, meta_path, token_dtype
from orchestrator.data.progress import TokenizeProgress
from orchestrator.data.tokenizer import Tokenizer

FORMAT = 1  # of the work dir: bump when a part's content or the chunking changes
CHUNK_BYTES = 4_000_000


@dataclass
class Chunk:
    index: int
    texts: list[str]
    labels: list[str]  # the output each document goes to (one label for `grow prepare`)
    nbytes: int  # input bytes it stands for, for the progress


def _documents_by_file(source: SourceConfig) -> Iterator[tuple[Path | None, Iterator[tuple[str, str]]]]:
    """(file, its documents) of a files source, file by file (so the progress can count each
    file's size); any other kind as one stream without a file."""
    if source.kind != "files":
        yield None, iter_documents(source)
        return
    for prefix, path in source_files(source):
        one = SourceConfig(kind="files", paths=[str(path)], format=source.format, jsonl_key=source.jsonl_key)
        yield path, ((prefix + doc_id[len(str(path)):], text) for doc_id, text in iter_documents(one))


def read_chunks(source: SourceConfig, chunk_bytes: int = CHUNK_BYTES,
                label_of: Callable[[str], str] = lambda doc_id: "text") -> Iterator[Chunk]:
    """The documents of `source` in corpus order (doc ids as corpus.iter_documents names
    them), cut into chunks of about `chunk_bytes` of UTF-8 text. A chunk's nbytes also
    counts what its files held besides the text (JSON keys and quoting), so the progress
    ends at the files' total size."""
    index, texts, labels, size = 0, [], [], 0
    for path, docs in _documents_by_file(source):
        counted = 0
        for doc_id, text in docs:
            n = len(text.encode("utf-8"))
            texts.append(text)
            labels.append(label_of(doc_id))
            size, counted = size + n, counted + n
            if size >= chunk_bytes:
                yield Chunk(index, texts, labels, size)
                index, texts, labels, size = index + 1, [], [], 0
        if path is not None:
            size += max(0, path.stat().st_size - counted)
    if texts:
        yield Chunk(index, texts, labels, size)


def source_bytes(source: SourceConfig) -> int | None:
    """Bytes of input a source reads: its files' sizes (None for the built-in kinds)."""
    if source.kind != "files":
        return None
    return sum(path.stat().st_size for _, path in source_files(source))


# -- tokenizing: in the workers (or in-process with workers=1) -------------------------
_worker_tok: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _worker_tok
    _worker_tok = tok


def tokenize_documents(tok: Tokenizer, texts: Sequence[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, tokens) of `texts`: each document is [bos] ids eos, all concatenated."""
    bos_id = getattr(tok, "bos_id", None)
    head = [np.array([bos_id], dtype=dtype)] if bos_id is not None else []
    eos = np.array([tok.eos_id], dtype=dtype)
    parts, lengths = [], np.empty(len(texts), dtype=np.int64)
    for i, ids in enumerate(tok.encode_batch(list(texts))):
        parts += [*head, ids.astype(dtype, copy=False), eos]
        lengths[i] = len(head) + len(ids) + 1
    return lengths, (np.concatenate(parts) if parts else np.empty(0, dtype=dtype))


def _tokenize_in_worker(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return tokenize_documents(_worker_tok, texts, np.dtype(dtype))


# -- parts ----------------------------------------------------------------------------
class WorkDir:
    """`<output>.work/`: the finished parts of an interrupted preparation, keyed by what
    they were made from, so a rerun keeps them only when they are still right."""

    def __init__(self, path: Path, key: dict):
        self.path = path
        stamp = read_json(path / "key.json")
        if stamp != key and path.exists():
            shutil.rmtree(path)  # another input or tokenizer: nothing in it can be reused
        path.mkdir(parents=True, exist_ok=True)
        for stray in path.glob("*.tmp*"):  # a part a kill interrupted
            stray.unlink()
        if stamp != key:
            write_json_atomic(path / "key.json", key)
        kept = len(list(path.glob("*.done")))
        if kept:
            print(f"prepare: resuming: {kept} finished part(s) kept in {path}", file=sys.stderr)

    def part(self, index: int, label: str) -> str:
        return str(self.path / f"part-{index:07d}.{label}")

    def done(self, index: int) -> dict | None:
        """{label: documents} of a finished chunk, else None."""
        return read_json(self.path / f"part-{index:07d}.done")

    def write(self, chunk: Chunk, lengths: np.ndarray, tokens: np.ndarray, dtype: np.dtype) -> dict:
        """Part files of `chunk` (one dataset per label it has), then its marker."""
        labels = np.asarray(chunk.labels)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        counts = {}
        for label in dict.fromkeys(chunk.labels):  # first-seen order, deterministic
            mine = np.flatnonzero(labels == label)
            with IndexedWriter(Path(self.part(chunk.index, label)), dtype) as part:
                for start, end in zip(starts[mine], ends[mine]):
                    part.add(tokens[start:end])
                part.commit()
            counts[label] = [int(mine.size), int(lengths[mine].sum())]
        write_json_atomic(self.path / f"part-{chunk.index:07d}.done", counts)
        return counts


def _tokenized(chunks: Iterator[Chunk], work: WorkDir, tok: Tokenizer, dtype: np.dtype, workers: int,
               progress: TokenizeProgress) -> list[dict]:
    """Every chunk's part on disk; returns each chunk's {label: [documents, tokens]}."""
    done: list[dict] = []

    def finish(chunk: Chunk, result) -> None:
        counts = work.write(chunk, *result, dtype)
        done.append(counts)
        progress.advance(chunk.nbytes, sum(t for _, t in counts.values()))

    pending: deque = deque()
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok,)) if workers > 1 else None
    progress.start()
    try:
        for chunk in chunks:
            counts = work.done(chunk.index)
            if counts is not None:  # finished by an earlier run
                while pending:  # keep `done` in chunk order
                    c, r = pending.popleft()
                    finish(c, r.get())
                done.append(counts)
                progress.skip(chunk.nbytes, sum(t for _, t in counts.values()))
                continue
            if pool is None:
                finish(chunk, tokenize_documents(tok, chunk.texts, dtype))
                continue
            pending.append((chunk, pool.apply_async(_tokenize_in_worker, (chunk.texts, dtype.name))))
            chunk.texts = []  # the worker has its copy; the parent keeps only the labels
            if len(pending) >= 2 * workers:
                c, r = pending.popleft()
                finish(c, r.get())
        while pending:
            c, r = pending.popleft()
            finish(c, r.get())
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return done


def _move_last_document(work: WorkDir, done: list[dict], dtype: np.dtype, src: str, dst: str) -> None:
    """The last document labelled `src` becomes the only one labelled `dst` (a source whose
    documents all hashed into train still needs one for validation)."""
    chunks = [i for i, counts in enumerate(done) if src in counts]
    if not chunks:
        return
    i = chunks[-1]
    ds = megatron_indexed().IndexedDataset(work.part(i, src))
    docs = [np.array(ds[j]) for j in range(len(ds))]
    del ds
    for label, kept in ((src, docs[:-1]), (dst, docs[-1:])):
        with IndexedWriter(Path(work.part(i, label)), dtype) as part:
            for doc in kept:
                part.add(doc)
            part.commit()
        done[i][label] = [len(kept), int(sum(map(len, kept)))]
    if not done[i][src][0]:
        del done[i][src]


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Held while one process prepares into `directory`: a second preparer of the same
    output waits, then finds it done, instead of wiping the first one's parts."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- publishing -----------------------------------------------------------------------
def prefix_meta(tok: Tokenizer, documents: int, tokens: int, inputs: list[str]) -> dict:
    """What `<prefix>.json` holds (indexed.read_prefix_meta reads it): the tokenizer the
    ids mean something in, and counts."""
    return {"tokenizer": {"kind": type(tok).__name__.removesuffix("Tokenizer").lower(),
                          "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                          "eos_id": tok.eos_id, "bos_id": getattr(tok, "bos_id", None)},
            "documents": documents, "tokens": tokens, "inputs": inputs}


def published(prefix: Path) -> list[Path]:
    return [Path(f"{prefix}{ext}") for ext in (".idx", ".bin", ".json")]


def publish(prefix: Path, parts: list[str], dtype: np.dtype, meta: dict) -> None:
    """Merge `parts` in order into `prefix` with the builder's add_index; the .idx last."""
    tmp = f"{prefix}.{os.getpid()}.tmp"
    try:
        builder = megatron_indexed().IndexedDatasetBuilder(tmp + ".bin", dtype=dtype.type)
        # add_index runs gc.collect() after every part: with torch loaded that scans ~1M
        # objects (0.4 s each); frozen, it scans only what the merge itself creates
        gc.freeze()
        try:
            for part in parts:
                builder.add_index(part)
        finally:
            gc.unfreeze()
        builder.finalize(tmp + ".idx")
        for ext in (".bin", ".idx"):
            fsync_file(Path(tmp + ext))
        for old in published(prefix):  # overwrite: the old .idx goes first, so no mix reads whole
            old.unlink(missing_ok=True)
        write_json_atomic(meta_path(prefix), meta)
        os.replace(tmp + ".bin", f"{prefix}.bin")
        os.replace(tmp + ".idx", f"{prefix}.idx")
        fsync_dir(prefix.parent)
    finally:
        for ext in (".bin", ".idx"):
            Path(tmp + ext).unlink(missing_ok=True)


def write_indexed(chunks: Iterable[Chunk], outputs: dict[str, Path], tok: Tokenizer, *, key: dict,
                  work_dir: Path, workers: int, progress: TokenizeProgress, inputs: list[str],
                  never_empty: tuple[str, str] | None = None) -> dict[str, dict]:
    """Tokenize `chunks` into one indexed dataset per label (`outputs[label]` its prefix);
    returns each output's metadata. `key` says what the chunks are made of (for resuming).
    never_empty=(a, b): when no document is labelled a, the last one labelled b moves to a."""
    dtype = token_dtype(tok.vocab_size)
    work = WorkDir(work_dir, {"format": FORMAT, "tokenizer": tok.fingerprint, "dtype": dtype.name,
                              "outputs": sorted(outputs), **key})
    try:
        done = _tokenized(iter(chunks), work, tok, dtype, workers, progress)
    except DataError:  # bad input: once it is fixed its key changes and no part can be reused
        shutil.rmtree(work_dir)
        raise
    if never_empty and not any(never_empty[0] in counts for counts in done):
        _move_last_document(work, done, dtype, never_empty[1], never_empty[0])
    metas = {}
    for label, prefix in outputs.items():
        mine = [(i, c[label]) for i, c in enumerate(done) if label in c]
        meta = prefix_meta(tok, sum(d for _, (d, _) in mine), sum(t for _, (_, t) in mine), inputs)
        publish(prefix, [work.part(i, label) for i, _ in mine], dtype, meta)
        metas[label] = meta
    shutil.rmtree(work_dir)
    return metas


def prepare_files(source: SourceConfig, output: Path, tok: Tokenizer, *, workers: int = 1,
                  overwrite: bool = False, chunk_bytes: int = CHUNK_BYTES,
                  progress_label: str = "prepare") -> dict:
    """`grow prepare`: every document of a files source into one indexed dataset at
    `output` (a prefix). Refuses an existing output unless `overwrite`."""
    output = Path(output)
    if not output.parent.is_dir():
        raise DataError(f"{output.parent}: no such directory", "output")
    with locked(output.parent):
        return _prepare_files(source, output, tok, workers, overwrite, chunk_bytes, progress_label)


def _prepare_files(source: SourceConfig, output: Path, tok: Tokenizer, workers: int, overwrite: bool,
                   chunk_bytes: int, progress_label: str) -> dict:
    existing = [p for p in published(output) if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} exists; give overwrite=true to replace it", "output")
    files = source_files(source)
    inputs = [str(path.resolve()) for _, path in files]
    key = {"inputs": [[p, path.stat().st_size, path.stat().st_mtime_ns] for p, (_, path) in zip(inputs, files)],
           "format": source.format, "jsonl_key": source.jsonl_key, "chunk_bytes": chunk_bytes}
    with TokenizeProgress(progress_label, source_bytes(source)) as progress:
        metas = write_indexed(read_chunks(source, chunk_bytes), {"text": output}, tok, key=key,
                              work_dir=Path(f"{output}.work"), workers=workers, progress=progress,
                              inputs=inputs)
        progress.complete()
    return metas["text"]
