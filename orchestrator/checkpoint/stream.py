"""A safetensors file written one tensor at a time: the header is computed up front from
the tensors' names, dtypes and shapes, so a writer never holds more than the tensor it is
writing (offline tools, the growth transition of a run, and every checkpoint save).

The file's sha256 is computed from the bytes as they are written, so sealing a checkpoint
needs no second pass over its files: with `keep_digest` the digest is left beside the file
(`.<name>.written.json`, with the size, inode and mtime the file had once fsynced), and
`canonical.write_manifest` takes it instead of hashing the file again, as long as the file
is still the one it describes (else it hashes the file). On many ranks this splits the
hashing over the writers, each hashing what it writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
WRITTEN_SUFFIX = ".written.json"


@dataclass
class Written:
    """What writing one file took: its sha256 and size, and seconds spent producing the
    tensors (reading and computing them: the caller's iterator), writing, hashing and
    fsyncing."""

    sha256: str
    bytes: int
    seconds: dict = field(default_factory=dict)


def written_path(path: Path) -> Path:
    """Where the digest of `path`, taken while writing it, is left (hidden, beside it)."""
    path = Path(path)
    return path.with_name(f".{path.name}{WRITTEN_SUFFIX}")


def layout_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The layout of a dict of tensors, in its order."""
    return [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def write_safetensors_stream(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                             tensors: Iterable[tuple[str, torch.Tensor]], keep_digest: bool = False,
                             seconds: dict | None = None) -> Written:
    """Write a safetensors file whose tensors arrive one by one, in `layout` order; returns
    its digest and timings (added to `seconds`, which may hold the producer's own, e.g. its
    reads). `keep_digest`: also leave both in `written_path(path)` for the seal of the
    checkpoint the file belongs to (which reports the timings and removes the record)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in layout:
        n = torch.tensor([], dtype=dtype).element_size()
        for s in shape:
            n *= s
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    expected = iter(layout)
    digest = hashlib.sha256()
    seconds = {} if seconds is None else seconds
    for key in ("produce", "write", "hash", "sync"):
        seconds.setdefault(key, 0.0)
    path = Path(path)
    written_path(path).unlink(missing_ok=True)  # a digest of an earlier file of this name
    with open(path, "wb") as f:
        head = struct.pack("<Q", len(blob)) + blob
        f.write(head)
        digest.update(head)
        items = iter(tensors)
        while True:
            t0 = time.perf_counter()
            item = next(items, None)
            t1 = time.perf_counter()
            seconds["produce"] += t1 - t0
            if item is None:
                break
            name, t = item
            want, dtype, shape = next(expected)
            if name != want or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"internal: got {name} {tuple(t.shape)}, expected {want} {shape}")
            t = t.detach().to(dtype).contiguous()
            if t.numel():  # the tensor's own bytes, not a copy of them
                data = t.view(-1).view(torch.uint8).numpy().data
                digest.update(data)  # hashlib frees the GIL on large buffers
                t2 = time.perf_counter()
                f.write(data)
                t3 = time.perf_counter()
                seconds["hash"] += t2 - t1
                seconds["write"] += t3 - t2
        if next(expected, None) is not None:
            raise RuntimeError(f"internal: {path.name} got fewer tensors than its header lists")
        t0 = time.perf_counter()
        f.flush()
        os.fsync(f.fileno())
        seconds["sync"] += time.perf_counter() - t0
        st = os.fstat(f.fileno())
    out = Written(digest.hexdigest(), len(head) + offset, seconds)
    if st.st_size != out.bytes:
        raise RuntimeError(f"internal: {path} has {st.st_size} bytes, {out.bytes} were written")
    if keep_digest:
        _keep(path, out, st)
    return out


def _keep(path: Path, out: Written, st: os.stat_result) -> None:
    record = {"sha256": out.sha256, "bytes": out.bytes, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns,
              "seconds": {k: round(v, 4) for k, v in out.seconds.items()}}
    tmp = written_path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, written_path(path))


def written_record(path: Path) -> dict | None:
    """The record `keep_digest` left for `path` (None: none, or unreadable)."""
    try:
        record = json.loads(written_path(path).read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def digest_written(path: Path) -> str | None:
    """The sha256 taken while `path` was written, if its record is there and `path` is still
    the file it describes (same inode, size and mtime); None: hash the file."""
    try:
        record = json.loads(written_path(path).read_text())
        st = os.stat(path)
        if (st.st_ino, st.st_size, st.st_mtime_ns) == (record["ino"], record["bytes"], record["mtime_ns"]):
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None
