"""Validation per source: loss and bits-per-byte for each data source and overall.

A loss in nats per token depends on the tokenizer (a BPE token holds more text than a
byte) and on the language (a Chinese character is three UTF-8 bytes), so the losses of
two runs, or of English and Chinese in one run, do not compare. Bits per byte do: the
same loss spread over the bytes of text the tokens stand for,

    bpb = loss_nats * tokens / (bytes * ln 2).

Each source is evaluated on its own fixed batches (`validation_batches` over that source
alone), so `val/<source>/loss` is that source's loss; `val/loss` is their token-weighted
mean, which equals the mean over all the batches together, the set a growth check uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.data import TokenStream, validation_batches

LN2 = math.log(2.0)


@dataclass(frozen=True)
class ValSet:
    """One source's fixed validation batches, with the token and byte counts of their
    targets (tokens[:, 1:], the positions the loss is taken over)."""
    batches: list[torch.Tensor]
    tokens: int
    bytes: int


def val_sets(streams: dict[str, TokenStream], token_bytes: np.ndarray, batch_size: int, seq_len: int,
             n_batches: int) -> dict[str, ValSet]:
    """n_batches of [batch_size, seq_len + 1] per source, sources in sorted name order."""
    out = {}
    for name in sorted(streams):
        batches = validation_batches({name: streams[name]}, batch_size, seq_len, n_batches)
        targets = [b[:, 1:].numpy() for b in batches]
        out[name] = ValSet(batches, sum(t.size for t in targets), int(sum(token_bytes[t].sum() for t in targets)))
    return out


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    return loss_nats * tokens / (n_bytes * LN2)


def evaluate_sources(engine, sets: dict[str, ValSet]) -> tuple[float, dict]:
    """(val loss, metrics): `val/loss`, `val/bpb` and `val/<source>/loss|bpb`."""
    metrics, nats, tokens, n_bytes = {}, 0.0, 0, 0
    for name, s in sets.items():
        loss = engine.evaluate(s.batches)
        metrics[f"val/{name}/loss"] = loss
        metrics[f"val/{name}/bpb"] = bits_per_byte(loss, s.tokens, s.bytes)
        nats, tokens, n_bytes = nats + loss * s.tokens, tokens + s.tokens, n_bytes + s.bytes
    loss = nats / tokens
    return loss, {"val/loss": loss, "val/bpb": bits_per_byte(loss, tokens, n_bytes), **metrics}


def by_source(metrics: dict) -> dict[str, dict]:
    """{source: {"loss", "bpb"}} from the metrics of `evaluate_sources` (for summary.json)."""
    out: dict[str, dict] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "val":
            out.setdefault(parts[1], {})[parts[2]] = value
    return out
