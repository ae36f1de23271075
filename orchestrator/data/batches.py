"""Training and validation batches, addressed by a cursor instead of an iterator.

The cursor is a small JSON-serialisable dict:

    {"sequences": int, "offsets": {source_name: int}}

`sequences` counts the sequences read so far in the cursor's life and decides, through
`mixture.Schedule`, which source each next sequence comes from; `offsets[name]` is the
next token offset in that source's train stream. Everything about the read order is a
pure function of (cursor, streams, mixture, batch_size, seq_len), so a checkpoint that
stores the cursor resumes on exactly the next tokens, on any machine.

Data parallelism does not enter here: every rank computes the same *global* batch and
rank r of dp takes rows [r*B/dp : (r+1)*B/dp] (`rank_slice`). The global stream, and
so a resume, is therefore independent of dp, and a run may change its dp between
stages or on resume without skipping or repeating data. The engine does the slicing.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from orchestrator.data.indexed import TokenStream
from orchestrator.data.errors import DataError
from orchestrator.data.mixture import Schedule, resolve_weights

def new_cursor(names) -> dict:
    """The cursor of a stream not yet read: sequence 0, every source at offset 0."""
    return {"sequences": 0, "offsets": {n: 0 for n in sorted(names)}}


def _check_int(what: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def check_cursor(cursor) -> tuple[int, dict[str, int]]:
    """The sequences read and the offsets of a cursor (a copy); DataError if it is not one (a
    checkpoint's meta.json is checked with this before a run resumes from it)."""
    if not isinstance(cursor, dict) or not isinstance(cursor.get("offsets"), dict):
        raise DataError(f"cursor must be {{'sequences': int, 'offsets': {{name: int}}}}, got {cursor!r}")
    return (_check_int("cursor sequences", cursor.get("sequences"), 0),
            {n: _check_int(f"cursor offset of {n!r}", o, 0) for n, o in cursor["offsets"].items()})


@lru_cache(maxsize=64)
def _schedule(names: tuple[str, ...], weights: tuple[float, ...]) -> Schedule:
    return Schedule(names, weights)


@lru_cache(maxsize=256)
def _stride(windows: int) -> int:
    """A step coprime with `windows` near its golden-ratio fraction, so consecutive reads
    land far apart and every window is visited once per epoch."""
    a = max(1, round(windows * 0.6180339887))
    while math.gcd(a, windows) != 1:
        a += 1
    return a


def shuffled_start(stream_len: int, offset: int, seq_len: int) -> int:
    """Where the window consumed at `offset` starts. The offset counts tokens consumed;
    window k = offset // seq_len is mapped through an affine permutation of the
    stream's windows (shifted each epoch), so batches mix distant parts of the corpus,
    the order stays a pure function of the offset, and an epoch reads every window once."""
    windows = max(1, stream_len // seq_len)
    k, rest = divmod(offset, seq_len)
    epoch, j = divmod(k, windows)
    shift = (epoch * 0x9E3779B1) % windows
    return ((_stride(windows) * j + shift) % windows) * seq_len + rest


def next_global_batch(streams: dict[str, TokenStream], cursor: dict, mixture: dict[str, float] | None,
                      batch_size: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """The next global batch and the cursor after it (the given cursor is not changed).

    Returns `tokens` of shape [batch_size, seq_len + 1]: inputs are tokens[:, :-1] and
    labels tokens[:, 1:]. Row i is sequence s = cursor["sequences"] + i; its source is
    `Schedule.pick(s)` over `mixture` (None: equal weights over `streams`), its tokens the
    window of seq_len + 1 that the source's offset maps to (`shuffled_start`), after which
    the offset advances by seq_len. Offsets past the end of a stream wrap around (epochs). Offsets of sources not read here are carried along
    unchanged, so a cursor survives a stage whose mixture leaves some sources out."""
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    start, offsets = check_cursor(cursor)
    names, weights = resolve_weights(list(streams), mixture)
    for n in names:
        offsets.setdefault(n, 0)
    picks = _schedule(names, weights).picks(start, batch_size)
    out = np.empty((batch_size, seq_len + 1), dtype=np.int64)
    for i, k in enumerate(picks.tolist()):
        name = names[k]
        stream = streams[name]
        out[i] = stream.window(shuffled_start(len(stream), offsets[name], seq_len), seq_len + 1)
        offsets[name] += seq_len
    return torch.from_numpy(out), {"sequences": start + batch_size, "offsets": offsets}


def tokens_read(before: dict, after: dict) -> dict[str, int]:
    """Training tokens each source gave between two cursors: its offset advances by the
    tokens it gives, so this is exact whatever the mixture or the sequence length."""
    return {n: o - before["offsets"].get(n, 0) for n, o in after["offsets"].items()
            if o != before["offsets"].get(n, 0)}


def rank_slice(tokens: torch.Tensor, rank: int, dp: int) -> torch.Tensor:
    """Rows of the global batch that data-parallel rank `rank` of `dp` trains on."""
    b = tokens.shape[0]
    if dp < 1 or b % dp or not 0 <= rank < dp:
        raise DataError(f"cannot split a batch of {b} rows into dp={dp} equal parts for rank {rank}")
    per = b // dp
    return tokens[rank * per:(rank + 1) * per]


def validation_batches(val_streams: dict[str, TokenStream], batch_size: int, seq_len: int,
                       n_batches: int) -> list[torch.Tensor]:
    """Fixed evaluation batches, identical on every call: sequence i comes from the
    sources in sorted name order, round-robin, and is that source's (i // K)-th
    consecutive window from offset 0 (wrapping if the val split is short). Each batch is
    [batch_size, seq_len + 1] like a training batch."""
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    n_batches = _check_int("n_batches", n_batches, 0)
    names = sorted(val_streams)
    if not names:
        raise DataError("no validation streams")
    out = []
    for b in range(n_batches):
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for r in range(batch_size):
            i = b * batch_size + r
            rows[r] = val_streams[names[i % len(names)]].window((i // len(names)) * seq_len, seq_len + 1)
        out.append(torch.from_numpy(rows))
    return out
